"""`shmemctl tui`: the live administration console. It talks to control sockets only."""
