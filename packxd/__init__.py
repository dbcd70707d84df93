"""packxd: a root daemon that launches desktop apps from LXC rootfs directories
in fresh Linux namespaces, and its client.

Kept empty on purpose: the client imports ``packxd.*`` on every launch and must
pull in nothing beyond the standard library.
"""
