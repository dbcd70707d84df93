"""packxd's actors: the per-client handler (root, in the daemon), the
userrundir worker (a subprocess as the caller) and the guest app actor (in
the container, as the container's user)."""
