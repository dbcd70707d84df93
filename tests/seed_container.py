"""The seed's container init script, ported from Lua to a pactors init script.

Used by the namespace tests and the benchmarks. The script takes no data
formatted into its source: everything variable arrives over ``arg``.
"""

SEED_INIT_SCRIPT = r"""
# sync point #1
C.read(arg, 1)
C.write(arg, '.')

# sync point #2: tmpfs mkdir fails with EOVERFLOW until the maps exist
C.read(arg, 1)

C.setresuid(0, 0, 0)
C.setresgid(0, 0, 0)

# unshare propagation events
C.mount(None, '/', None, C.MS_PRIVATE | C.MS_REC)

# /mnt becomes the new /
C.umask(0)
C.mount(None, '/mnt', 'tmpfs', 0)
C.mkdir('/mnt/proc', mode(7, 5, 5))
C.mount(None, '/mnt/proc', 'proc', 0)
C.mkdir('/mnt/sys', mode(7, 5, 5))
C.mount(None, '/mnt/sys', 'sysfs', C.MS_RDONLY | C.MS_NOSUID | C.MS_NODEV | C.MS_NOEXEC)
C.mkdir('/mnt/tmp', mode(7, 7, 7) | C.S_ISVTX)
C.mkdir('/mnt/run', mode(7, 5, 5))
C.mkdir('/mnt/run/user', mode(7, 5, 5))
C.mkdir('/mnt/run/user/1000', mode(7, 0, 0))
C.chown('/mnt/run/user/1000', 1000, 1000)
C.mkdir('/mnt/etc', mode(7, 5, 5))

C.mkdir('/mnt/dev', mode(7, 5, 5))
C.mkdir('/mnt/dev/pts', mode(7, 5, 5))
C.mkdir('/mnt/dev/shm', mode(7, 7, 7) | C.S_ISVTX)
C.mkdir('/mnt/dev/mqueue', mode(7, 7, 7) | C.S_ISVTX)
C.symlink('/proc/self/fd', '/mnt/dev/fd')
C.symlink('/dev/pts/ptmx', '/mnt/dev/ptmx')
C.symlink('/proc/self/fd/0', '/mnt/dev/stdin')
C.symlink('/proc/self/fd/1', '/mnt/dev/stdout')
C.symlink('/proc/self/fd/2', '/mnt/dev/stderr')
for node in ('full', 'null', 'random', 'tty', 'urandom', 'zero'):
    C.mknod('/mnt/dev/' + node, mode(6, 6, 6), 0)
    C.mount('/dev/' + node, '/mnt/dev/' + node, None, C.MS_BIND)
C.mount(None, '/mnt/dev/pts', 'devpts', 0, 'newinstance,gid=1000,mode=620,ptmxmode=0666')
C.mount(None, '/mnt/dev/mqueue', 'mqueue', 0)

passwd = C.open('/mnt/etc/passwd', C.O_WRONLY | C.O_CREAT, mode(6, 4, 4))
write_all(passwd, 'user:x:1000:1000::/home/user:/bin/sh\n')

C.mkdir('/mnt/home', mode(7, 5, 5))
C.mkdir('/mnt/home/user', mode(7, 5, 5))

C.mkdir('/mnt/usr', mode(7, 5, 5))
C.mount('/usr', '/mnt/usr', None, C.MS_BIND | C.MS_REC)
C.mount(None, '/mnt/usr', None, C.MS_REMOUNT | C.MS_BIND | C.MS_RDONLY)
C.symlink('usr/bin', '/mnt/bin')
C.symlink('usr/lib', '/mnt/lib')
C.symlink('usr/lib64', '/mnt/lib64')
C.symlink('usr/sbin', '/mnt/sbin')

# pivot root
C.mkdir('/mnt/mnt', mode(7, 5, 5))
C.chdir('/mnt')
C.pivot_root('.', '/mnt/mnt')
C.chroot('.')
C.umount2('/mnt', C.MNT_DETACH)

modulefd = C.open('/app.py', C.O_WRONLY | C.O_CREAT, mode(6, 4, 4))
send_with_fd(arg, '.', modulefd)

# sync point #3: the host brings lo up and writes /app.py
C.read(arg, 1)

C.sethostname('packxd-test')
C.setdomainname('packxd-test')

C.umask(mode(0, 2, 2))

# drop all root privileges
C.setgroups([])
C.setresgid(1000, 1000, 1000)
C.setresuid(1000, 1000, 1000)

C.setsid()
"""

# What the script leaves in the new root, /app.py included.
SEED_ROOT = sorted(["app.py", "bin", "dev", "etc", "home", "lib", "lib64", "mnt", "proc",
                    "run", "sbin", "sys", "tmp", "usr"])
