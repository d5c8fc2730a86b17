"""The cache directory: remove what targets name, never following a link inside it;
run the queues' commands.

Names come from the database: each is one validated path component, every
directory is opened relative to its parent's fd with O_NOFOLLOW, and every
unlink is relative to an fd.
"""

import errno
import fcntl
import fnmatch
import logging
import math
import os
import shlex
import signal
import stat
import subprocess
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor     # not lazily, in the run

from .errors import ConfigError, count, cut, exit_status, one_line
from .templates import Target

UNLINK_THREADS = 3      # for a large batch: unlinking written-back pages waits on the disk
THREADS_FROM = 1000     # targets per thread at least: a small batch takes one
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
SUBDIR_FLAGS = DIR_FLAGS | os.O_NOFOLLOW
# A command is given no secret of ours, nor the daemon's progress pipe, nor
# any of libpq's variables (PGPASSWORD, PGPASSFILE, PGSERVICE, ...: PG*).
WITHHELD = ("CLEAR_CACHE_DSN", "CLEAR_CACHE_CONFIG_FD", "CLEAR_CACHE_PROGRESS_FD")
TICK = 0.1              # seconds between progress ticks while a command runs

log = logging.getLogger("clear_cache")


def kill_group(command):
    """Kill the process group command leads, then reap command."""
    try:
        os.killpg(command.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass    # the group is gone
    command.wait()


def open_cache_dir(path, write=True):
    """Open the cache root; a symlink here is the administrator's and is followed."""
    try:
        fd = os.open(path, DIR_FLAGS)
    except OSError as e:
        raise ConfigError("cache directory %s: %s" % (path, e.strerror)) from None
    if write and not os.access(path, os.W_OK | os.X_OK):
        os.close(fd)
        raise ConfigError("cache directory %s: not writable by this account (uid %d)"
                          % (path, os.geteuid()))
    return fd


def lock_cache_dir(path):
    """Hold the cache directory for this daemon alone, as long as it lives: an flock on
    the directory itself, which the kernel drops with the process, SIGKILL included.
    Its clearers do not inherit it (O_CLOEXEC), and a clear by hand takes none."""
    fd = open_cache_dir(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = lock_holder(fd)
        os.close(fd)
        raise ConfigError("cache directory %s: another daemon clears it%s; one daemon per"
                          " cache directory" % (path, " (pid %s)" % holder if holder else ""))
    return fd


def lock_holder(fd):
    """The pid holding an flock on fd's file, where the system says (Linux's /proc/locks)."""
    st = os.fstat(fd)
    try:
        with open("/proc/locks") as locks:
            for line in locks:      # 1: FLOCK  ADVISORY  WRITE 1234 fe:01:5678 0 EOF
                fields = line.split()
                if fields[1:2] != ["FLOCK"]:
                    continue
                major, minor, inode = fields[5].split(":")
                if (int(major, 16), int(minor, 16), int(inode)) == (
                        os.major(st.st_dev), os.minor(st.st_dev), st.st_ino):
                    return fields[4]
    except (OSError, ValueError, IndexError):
        pass
    return None


def open_subdir(dir_fd, name):
    """Open directory name under dir_fd; a symlink or a non-directory raises ENOTDIR."""
    try:
        return os.open(name, SUBDIR_FLAGS, dir_fd=dir_fd)
    except OSError as e:
        if e.errno not in (errno.ENOTDIR, errno.ELOOP):
            raise
        try:
            link = stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
        except OSError:
            link = False
        raise NotADirectoryError(errno.ENOTDIR, "is a symlink" if link
                                 else "is not a directory") from None


def in_this_thread(function, *args):
    """function(*args) as a finished Future: what it returned or raised."""
    future = Future()
    try:
        future.set_result(function(*args))
    except Exception as e:
        future.set_exception(e)
    return future


OUTPUT_LINES = 100      # of a command's output, per run of it; the rest are counted


def log_output(pipe, program):
    """Log each line a command writes as ours, at info level (-q hides them), named and cut."""
    name, lines = os.path.basename(program), 0
    with pipe:
        for raw in pipe:
            lines += 1
            if lines <= OUTPUT_LINES:
                log.info("command %s: %s", name, cut(raw.decode("utf-8", "replace").rstrip("\n")))
    if lines > OUTPUT_LINES:
        log.info("command %s: %s more not shown", name, count(lines - OUTPUT_LINES, "line"))


class Cache:
    """The cache directory, opened; what one run did to it, over all its attempts."""

    def __init__(self, cache_fd, cache_dir, dry_run=False, failures=logging.ERROR,
                 progress=lambda doing: None):
        self.cache_fd = cache_fd
        self.cache_dir = cache_dir
        self.dry_run = dry_run
        self.progress = progress    # says what it is doing: the daemon watches for a stop
        self.failures = failures    # the level of a failure's line; the daemon's runs say
                                    # each failing key calmly instead, with its reason
        # A serialization failure retries the transaction: count over all attempts.
        self.cleared = set()    # the items cleared
        self.files = 0          # the files removed
        self.requeued = {}      # {delay: re-clears queued}, of the attempt that committed
        self.reasons = {}       # a target or an item that failed -> why, its first failure

    def fail(self, what, text):
        """Say a failure at its level, and keep the first reason for what failed."""
        log.log(self.failures, "%s", text)
        self.reasons.setdefault(what, text)

    def clear(self, items, targets, commands):
        """Clear {Target: the items naming it}, then run {item: (argv, timeout)}.

        Returns the items that failed.  Each distinct target is cleared once,
        whichever items name it; a command runs once its item's pages are gone.
        """
        failed = self.clear_pages(targets)
        for item, (argv, timeout) in commands.items():
            if item not in failed and not self.run(item, argv, timeout):
                failed.add(item)
        self.cleared.update(item for item in items if item not in failed)
        return [item for item in items if item in failed]

    def clear_pages(self, targets):
        """Clear {Target: the items naming it}; return the set of items whose pages failed."""
        # Sorted, targets that share directories come together.  A large batch
        # is cut into UNLINK_THREADS runs of them, each with its own walk:
        # unlinking pages that were written back to disk mostly waits on the
        # filesystem.  A dry run prints in order.
        ordered = sorted(targets, key=lambda t: (t.dirs, t.last, t.pattern or "", t.directory))
        size = max(THREADS_FROM, len(ordered) if self.dry_run
                   else math.ceil(len(ordered) / UNLINK_THREADS))
        parts = [ordered[i:i + size] for i in range(0, len(ordered), size)] or [[]]
        with ThreadPoolExecutor(UNLINK_THREADS) as pool:
            futures = [pool.submit(self.clear_targets, part) for part in parts[1:]]
            futures.insert(0, in_this_thread(self.clear_targets, parts[0]))
        errors = [f.exception() for f in futures if f.exception() is not None]
        for error in errors[1:]:
            log.error("clearing in a thread: %s", one_line(error))
        if errors:
            raise errors[0]
        failed = set()
        for future in futures:
            bad, files = future.result()
            self.files += files
            for target in bad:
                failed.update(targets[target])
                # Its own failure, else the directory above it that could not be opened.
                reason = self.reasons.get(target) or next(
                    (self.reasons[target.dirs[:n]] for n in range(len(target.dirs), 0, -1)
                     if target.dirs[:n] in self.reasons), None)
                for item in targets[target]:
                    self.reasons.setdefault(item, reason)
        return failed

    def run(self, item, argv, timeout):
        """Run item's command, never through a shell; False if it failed."""
        if self.dry_run:
            print("would run: " + shlex.join(argv))
            return True
        env = {k: v for k, v in os.environ.items()
               if k not in WITHHELD and not k.startswith("PG")}
        try:    # its output is logged as ours; its process group is its own
            command = subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       env=env)
        except OSError as e:
            self.fail(item, "command %s: %s" % (shlex.join(argv), e.strerror))
            return False
        output = threading.Thread(target=log_output, args=(command.stdout, argv[0]),
                                  daemon=True)
        output.start()
        try:
            return self.wait_for(item, command, argv, timeout)
        finally:
            output.join(TICK * 10)      # its pipe closes with its group, killed below

    def wait_for(self, item, command, argv, timeout):
        """Wait for a command within its timeout, saying progress; kill its group after."""
        deadline = time.monotonic() + timeout
        try:
            while True:     # a command running within its timeout is progress
                self.progress("running command %s" % shlex.join(argv))
                try:
                    code = command.wait(min(TICK, max(0.0, deadline - time.monotonic())))
                    break
                except subprocess.TimeoutExpired:
                    if time.monotonic() >= deadline:
                        self.fail(item, "command %s: still running after %g s: killed"
                                  % (shlex.join(argv), timeout))
                        return False
        finally:    # nothing it started outlives it (a setsid is the site's business)
            kill_group(command)
        if code:
            self.fail(item, "command %s: exited with %s" % (shlex.join(argv), exit_status(code)))
        return code == 0

    def clear_targets(self, targets):
        """Clear each of the sorted targets; return (those that failed, files removed).

        Each directory is opened once, and only those along one path are open.
        """
        bad, files = [], 0
        # (name, fd, ok) along the current path.  fd None: nothing to clear
        # there; ok False: it, or a directory above it, could not be opened.
        opened = [("", self.cache_fd, True)]
        try:
            for n, target in enumerate(targets):
                if not n % 100:
                    self.progress("removing pages")
                dirs = target.dirs
                same = 1
                while (same < min(len(opened), len(dirs) + 1)
                       and opened[same][0] == dirs[same - 1]):
                    same += 1
                while len(opened) > same:
                    fd = opened.pop()[1]
                    if fd is not None:
                        os.close(fd)
                for depth in range(len(opened), len(dirs) + 1):
                    _, parent, ok = opened[-1]
                    fd, ok = (None, ok) if parent is None else self.open_dir(parent,
                                                                             dirs[:depth])
                    opened.append((dirs[depth - 1], fd, ok))
                _, fd, ok = opened[-1]
                if fd is not None:
                    ok, removed = self.remove(fd, target)
                    files += removed
                if not ok:
                    bad.append(target)
        finally:
            for _, fd, _ in opened[1:]:
                if fd is not None:
                    os.close(fd)
        return bad, files

    def open_dir(self, parent_fd, dirs):
        """(fd, True) of directory dirs; (None, True): nothing to clear; (None, False): failed."""
        try:
            return open_subdir(parent_fd, dirs[-1]), True
        except FileNotFoundError:
            return None, True
        except NotADirectoryError as e:
            # Not ours to follow; retrying would not change it.
            log.warning("%s: %s, not entered", self.path(*dirs), e.strerror)
            return None, True
        except OSError as e:
            self.fail(tuple(dirs), "cannot open %s: %s" % (self.path(*dirs), e.strerror))
            return None, False

    def remove(self, dir_fd, target):
        """Unlink the non-directory entries target names in dir_fd; return (none stays,
        files removed)."""
        dirs, last, pattern = target.dirs, target.last, target.pattern
        # Directories are told apart first: unlink(2) of one fails with EISDIR
        # on Linux but EPERM elsewhere.
        try:
            if target.directory:
                return self.remove_directory(dir_fd, dirs, last)
            if pattern is not None:
                with os.scandir(dir_fd) as entries:
                    found = [(e.name, e.is_dir(follow_symlinks=False)) for e in entries
                             if fnmatch.fnmatchcase(e.name, pattern)]
            else:
                mode = os.stat(last, dir_fd=dir_fd, follow_symlinks=False).st_mode
                found = [(last, stat.S_ISDIR(mode))]
        except FileNotFoundError:
            found = []
        except OSError as e:
            self.fail(target, "cannot read %s: %s" % (self.path(*dirs, last), e.strerror))
            return False, 0
        ok = True
        removed = 0
        for name, is_dir in found:
            try:
                if is_dir:
                    raise IsADirectoryError
                if self.dry_run:
                    print(self.path(*dirs, name))
                else:
                    os.unlink(name, dir_fd=dir_fd)
                removed += 1
            except FileNotFoundError:
                pass        # not there, or someone else removed it: that is the goal
            except IsADirectoryError:
                log.warning("%s: is a directory, left alone%s", self.path(*dirs, name),
                            "" if pattern else " (a template ends in /* for its files, or in"
                            " / for the directory itself)")
            except OSError as e:
                self.fail(target, "cannot remove %s: %s" % (self.path(*dirs, name), e.strerror))
                ok = False
        log.debug("%s: %s %s", "/".join(dirs + (last,)),
                  "would remove" if self.dry_run else "removed", count(removed, "file"))
        return ok, removed

    def remove_directory(self, parent_fd, dirs, name):
        """Unlink the non-directory entries of directory name, then remove it if empty."""
        fd, ok = self.open_dir(parent_fd, dirs + (name,))
        if fd is None:
            return ok, 0
        inside = Target(dirs + (name,), "*", "*", False)
        try:
            ok, removed = self.remove(fd, inside)
        finally:
            os.close(fd)
        if not ok:
            self.reasons.setdefault(Target(dirs, name, None, True), self.reasons.get(inside))
        if ok and not self.dry_run:
            try:
                os.rmdir(name, dir_fd=parent_fd)
            except OSError as e:
                # A renderer writing into it meanwhile, or a subdirectory: it stays.
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
                    self.fail(Target(dirs, name, None, True), "cannot remove %s: %s"
                              % (self.path(*dirs, name), e.strerror))
                    ok = False
        return ok, removed

    def path(self, *parts):
        """A path under the cache directory, for messages only."""
        return os.path.join(self.cache_dir, *parts)
