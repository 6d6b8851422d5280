/* relay_floor: the least a relay between a vhost-user front-end and back-end costs.
 *
 *     relay_floor [-B SPIN_US] FRONT_SOCKET BACK_SOCKET
 *
 * Listens on FRONT_SOCKET for one front-end, connects to the back-end on BACK_SOCKET,
 * and relays both ways what `shmemctl tap` relays, as the tap reads it: each message in
 * two exact reads (its 12-byte header, then the payload the header announces, so that
 * fds stay with their message) and one send with its fds. SET_BACKEND_REQ_FD is the one
 * message it changes, as the tap does: the back-end gets one end of a socket pair of the
 * relay's own, and the relay carries that channel too. It decodes nothing else, checks
 * nothing and records nothing: `shmemctl bench --tap --floor` runs it in the tap's place,
 * so that the tap's cost can be told from what any relay costs on the machine. Like our
 * daemons it polls SPIN_US microseconds (-B, default 200), yielding the core between polls,
 * before it sleeps. It trusts its peers: a payload over 64K or a broken socket ends it.
 * Exits 0 when the front-end hangs up.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define HEADER 12
#define MAX_PAYLOAD 65536
#define FLAG_REPLY 0x4
#define SET_BACKEND_REQ_FD 21
#define MAX_FDS 253
#define MAX_DIRECTIONS 16 /* main and up to 7 backend channels, two directions each */

struct direction {
    int from, to;
    int main_from_front; /* where SET_BACKEND_REQ_FD comes from */
    size_t have, want;
    int fds[MAX_FDS * 2];
    int nfds;
    unsigned char buf[HEADER + MAX_PAYLOAD];
};

static struct direction directions[MAX_DIRECTIONS];
static struct pollfd polled[MAX_DIRECTIONS];
static int ndirections;

static void die(const char *what) {
    perror(what);
    exit(1);
}

static void add_channel(int front, int back, int is_main) {
    if (ndirections + 2 > MAX_DIRECTIONS) {
        fprintf(stderr, "relay_floor: too many channels\n");
        exit(1);
    }
    int ends[2][2] = {{front, back}, {back, front}};
    for (int i = 0; i < 2; i++) {
        struct direction *d = &directions[ndirections];
        d->from = ends[i][0];
        d->to = ends[i][1];
        d->main_from_front = is_main && i == 0;
        d->have = d->nfds = 0;
        d->want = HEADER;
        polled[ndirections].fd = d->from;
        polled[ndirections].events = POLLIN;
        ndirections++;
    }
}

static void send_on(int fd, const unsigned char *data, size_t n, const int *fds, int nfds) {
    char control[CMSG_SPACE(sizeof(int) * MAX_FDS)];
    struct iovec iov = {(void *)data, n};
    struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1};
    if (nfds > MAX_FDS) {
        fprintf(stderr, "relay_floor: more fds than one sendmsg passes\n");
        exit(1);
    }
    if (nfds) {
        m.msg_control = control;
        m.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
        struct cmsghdr *c = CMSG_FIRSTHDR(&m);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
        memcpy(CMSG_DATA(c), fds, sizeof(int) * nfds);
    }
    ssize_t sent = sendmsg(fd, &m, MSG_NOSIGNAL);
    if (sent < 0)
        die("sendmsg");
    for (size_t at = sent; at < n; at += sent)
        if ((sent = send(fd, data + at, n - at, MSG_NOSIGNAL)) < 0)
            die("send");
}

/* One read from `d`; 0 when its side hung up. */
static int step(struct direction *d) {
    char control[CMSG_SPACE(sizeof(int) * MAX_FDS)];
    struct iovec iov = {d->buf + d->have, d->want - d->have};
    struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control,
                       .msg_controllen = sizeof control};
    ssize_t got = recvmsg(d->from, &m, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
    if (got < 0)
        return errno == EAGAIN || errno == EINTR;
    if (got == 0)
        return 0;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&m); c; c = CMSG_NXTHDR(&m, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
            continue;
        int n = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        memcpy(d->fds + d->nfds, CMSG_DATA(c), n * sizeof(int));
        d->nfds += n;
    }
    d->have += got;
    if (d->have < d->want)
        return 1;
    uint32_t request, flags, size;
    memcpy(&request, d->buf, 4);
    memcpy(&flags, d->buf + 4, 4);
    memcpy(&size, d->buf + 8, 4);
    if (d->want == HEADER && size) {
        if (size > MAX_PAYLOAD) {
            fprintf(stderr, "relay_floor: a payload of %u bytes\n", size);
            exit(1);
        }
        d->want = HEADER + size;
        return 1;
    }
    if (d->main_from_front && request == SET_BACKEND_REQ_FD && !(flags & FLAG_REPLY) && d->nfds) {
        int pair[2];
        if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair))
            die("socketpair");
        add_channel(d->fds[0], pair[0], 0);
        d->fds[0] = pair[1]; /* closed once sent: the back-end has its own copy */
    }
    send_on(d->to, d->buf, d->want, d->fds, d->nfds);
    for (int i = 0; i < d->nfds; i++)
        close(d->fds[i]); /* a handed channel stays open: it is no longer among them */
    d->have = d->nfds = 0;
    d->want = HEADER;
    return 1;
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static int unix_socket(const char *path, struct sockaddr_un *address) {
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        die("socket");
    memset(address, 0, sizeof *address);
    address->sun_family = AF_UNIX;
    if (strlen(path) >= sizeof address->sun_path) {
        fprintf(stderr, "relay_floor: %s: path too long\n", path);
        exit(1);
    }
    strcpy(address->sun_path, path);
    return fd;
}

int main(int argc, char **argv) {
    double spin = 200e-6;
    int option;
    while ((option = getopt(argc, argv, "B:")) != -1) {
        if (option != 'B')
            goto usage;
        spin = atof(optarg) / 1e6;
    }
    if (argc - optind != 2)
        goto usage;
    const char *front_path = argv[optind], *back_path = argv[optind + 1];
    struct sockaddr_un address;
    int listener = unix_socket(front_path, &address);
    unlink(front_path);
    if (bind(listener, (struct sockaddr *)&address, sizeof address) || listen(listener, 1))
        die(front_path);
    int back = unix_socket(back_path, &address);
    if (connect(back, (struct sockaddr *)&address, sizeof address))
        die(back_path);
    int front = accept4(listener, NULL, NULL, SOCK_CLOEXEC);
    if (front < 0)
        die("accept");
    close(listener);
    unlink(front_path);
    add_channel(front, back, 1);
    for (;;) {
        double until = now() + spin;
        int ready;
        while ((ready = poll(polled, ndirections, 0)) == 0 && now() < until)
            sched_yield();
        if (ready == 0)
            ready = poll(polled, ndirections, -1);
        if (ready < 0 && errno != EINTR)
            die("poll");
        for (int i = 0; i < ndirections && ready > 0; i++) {
            if (!polled[i].revents)
                continue;
            if (!step(&directions[i])) {
                if (i == 0)
                    return 0; /* the front-end left */
                polled[i].fd = -1; /* a backend channel ended: poll skips it */
            }
        }
    }
usage:
    fprintf(stderr, "usage: relay_floor [-B SPIN_US] FRONT_SOCKET BACK_SOCKET\n");
    return 2;
}
