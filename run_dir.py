"""
A run's --out_dir: one run at a time (a lock), and files written without following links.

    import run_dir
    run_dir.lock(out_dir)                      # rank 0, before it reads or writes anything there
    run_dir.write_atomic(path, callback)       # callback(f) writes a new file; then renamed
    f = run_dir.open_append(path)              # log.jsonl

The lock is OUT_DIR/run.lock, held with fcntl.lockf (a POSIX record lock: the kernel, or the NFS
server, releases it when the process ends however it ends, so a lock left by a killed run is
simply free again; and unlike flock it is not inherited by the DataLoader workers that fork from
the trainer, which outlive a killed trainer by seconds). The file says who holds it (host, pid,
start time, command line), for the message that refuses a second run.

Writes never follow a symbolic link: someone who can write into --out_dir (a shared scratch
folder) could otherwise plant `ckpt_0000004.pt.tmp -> ~/.bashrc` and have the run overwrite a
file of theirs choosing. A new file is created with O_EXCL | O_NOFOLLOW (which fails on any
existing name, a link included); a link where the run's own file belongs is refused.
"""
import atexit
import fcntl
import importlib
import json
import os
import socket
import sys
import time

LOCK = 'run.lock'
RUN_FILES = ('config.json', 'log.jsonl', 'ckpt.pt')   # what the run writes there by name
_held = {}   # out_dir -> the open lock file: closing it would release the lock


class RunDirError(Exception):
    """--out_dir cannot be used as asked; the message is one line for the user."""


def lock(out_dir):
    """Hold OUT_DIR/run.lock until this process ends, or RunDirError naming who holds it."""
    path = os.path.join(out_dir, LOCK)
    if out_dir in _held:   # this process holds it already (a second main() in one process)
        return
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        raise RunDirError(f'--out_dir={out_dir}: cannot create its lock file {LOCK} '
                          f'({e.strerror})') from None
    f = os.fdopen(fd, 'r+')
    try:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (BlockingIOError, PermissionError):   # EAGAIN or EACCES: another process holds it
        holder = _describe(f.read())
        f.close()
        raise RunDirError(f'--out_dir={out_dir} is in use by another run ({holder}): one run per '
                          '--out_dir; wait for it to end, stop it, or use another --out_dir')
    except OSError as e:   # a filesystem without locks: say so, and go on as before
        print(f'warning: --out_dir={out_dir}: cannot lock {LOCK} ({e.strerror}); make sure no '
              'other run uses this --out_dir', file=sys.stderr)
    previous = f.read()
    if previous.strip():   # the lock was free but its file is there: that run ended
        print(f'note: {path} was left by a run that has ended ({_describe(previous)}); taking it '
              'over', file=sys.stderr)
    f.seek(0)
    f.truncate()
    json.dump({'host': socket.gethostname(), 'pid': os.getpid(),
               'since': time.strftime('%Y-%m-%d %H:%M:%S'), 'command': ' '.join(sys.argv)}, f)
    f.flush()
    _held[out_dir] = f
    atexit.register(_release, out_dir)


def _release(out_dir):
    """At a clean exit: the lock file emptied (a killed run leaves its holder's line, which the
    next run reports as taken over)."""
    f = _held.pop(out_dir, None)
    if f is not None:
        f.seek(0)
        f.truncate()
        f.close()


def _describe(text):
    try:
        who = json.loads(text)
        return f"pid {who['pid']} on {who['host']} since {who['since']}"
    except (ValueError, TypeError, KeyError):
        return 'holder unknown'


def open_new(path, mode='wb'):
    """A file object on a new file at path: O_CREAT | O_EXCL | O_NOFOLLOW, so never through a
    link and never into a file that exists. A leftover at path (a .tmp of a killed run, or a
    planted link) is unlinked first: unlinking a link removes the link, not its target."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        raise RunDirError(f'{path} is a directory') from None
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    return os.fdopen(fd, mode)


def refuse_link(path):
    """RunDirError if path is a symbolic link: the run's files are its own, never a link's."""
    if os.path.islink(path):
        raise RunDirError(f'{path} is a symbolic link (to {os.readlink(path)}); the run writes '
                          'only its own files: remove the link')


def write_atomic(path, write, binary=True):
    """write(f) into path + '.tmp' (new, no links followed), fsync, then rename onto path: a
    crash or a full disk mid-write leaves the previous file as it was, and no .tmp behind."""
    refuse_link(path)
    tmp = path + '.tmp'
    try:
        with open_new(tmp, 'wb' if binary else 'w') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        if os.path.lexists(tmp):
            os.remove(tmp)
        raise
    os.replace(tmp, path)


def write_json(path, obj):
    """obj as indented JSON at path (write_atomic); a full disk or a quota is one line."""
    try:
        write_atomic(path, lambda f: json.dump(obj, f, indent=1), binary=False)
    except (OSError, RunDirError) as e:
        raise SystemExit(f'error: cannot write {path}: {getattr(e, "strerror", None) or e}')


def open_append(path):
    """path opened for appending text (an AppendFile), refusing a link (O_NOFOLLOW)."""
    refuse_link(path)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    return AppendFile(os.fdopen(fd, 'a'), path)


class AppendFile:
    """A text file being appended to (log.jsonl) whose write errors (a full disk, a quota,
    ulimit -f) end the run with one line instead of a traceback; the checkpoints are intact."""

    def __init__(self, f, path):
        self.f, self.path = f, path

    def _do(self, call, *args):
        try:
            return call(*args)
        except OSError as e:
            raise SystemExit(f'error: cannot write {self.path}: {e.strerror}; the checkpoints '
                             'written so far are intact (--resume=auto continues)') from None

    def write(self, text):
        return self._do(self.f.write, text)

    def flush(self):
        return self._do(self.f.flush)

    def close(self):
        return self._do(self.f.close)


def claim(out_dir):
    """Make out_dir if need be and lock it (lock): RunDirError, one line, if it cannot be used
    (a file of that name, read-only storage, another run holding it)."""
    try:
        os.makedirs(out_dir, exist_ok=True)
    except FileExistsError:
        raise RunDirError(f'--out_dir={out_dir} is a file, not a folder') from None
    except OSError as e:
        raise RunDirError(f'--out_dir={out_dir}: cannot create it ({e.strerror})') from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise RunDirError(f'--out_dir={out_dir}: not writable here (read-only storage or '
                          'permissions)')
    lock(out_dir)
    for name in RUN_FILES:   # before any work: a link where the run's file belongs is refused
        refuse_link(os.path.join(out_dir, name))


# ----------------------------------------------------------------------------- trackers
class Tracker:
    """--logger: each log.jsonl record also goes to TensorBoard or Weights & Biases (rank 0)."""

    def __init__(self, kind, out_dir, config):
        self.kind, self.writer = kind, None
        if kind == 'tensorboard':
            tensorboard = importlib.import_module('torch.utils.tensorboard')
            self.writer = tensorboard.SummaryWriter(os.path.join(out_dir, 'tensorboard'))
        elif kind == 'wandb':
            wandb = importlib.import_module('wandb')
            self.writer = wandb.init(project='llip', dir=out_dir, config=config)

    def log(self, record):
        values = {k: v for k, v in record.items() if k not in ('step', 'time')}
        if self.kind == 'tensorboard':
            for key, value in values.items():
                self.writer.add_scalar(key, value, record['step'])
        elif self.kind == 'wandb':
            self.writer.log(values, step=record['step'])

    def close(self):
        if self.writer is not None:
            (self.writer.close if self.kind == 'tensorboard' else self.writer.finish)()
