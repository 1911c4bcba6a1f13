"""
What stops a run on a signal: SIGTERM (SLURM or torchrun stopping the job), SIGHUP (the terminal
closed) and Ctrl-C finish the step, save and exit 0 (train.py's `with Preemption(...)` around
the loop, checkpoint.save_run at the step's end); a rank that cannot finish its step (a peer is
gone) exits within --stop_grace seconds instead of hanging. README, "Reliability", lists each
fault and its test (tests/test_trust.py, tests/test_faults.py).
"""
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time


class Preemption:
    """SIGTERM (SLURM or torchrun stopping the job; they signal the whole process group),
    SIGHUP (the terminal closed) and Ctrl-C (SIGINT): the loop finishes its step, saves and exits
    0; a second Ctrl-C exits at once (130), without saving. A context manager: the previous
    handlers are back however main() ends (a leaked handler makes a later multiprocessing pool
    hang).
    - torch gives DataLoader workers a SIGTERM handler that kills them, and a Ctrl-C reaches the
      whole foreground group; either way the trainer would fail before saving. deaf_workers()
      starts them with these signals blocked (they stay pending in them; they exit on their own
      once the trainer is gone).
    - Python runs handlers only between bytecodes of the main thread: a rank blocked in a
      collective on a dead peer never gets there, and would delay torchrun's restart. The
      signal also wakes a watchdog thread (signal.set_wakeup_fd), which ends the process
      unless the step and the save are done within `grace` seconds."""

    SIGNALS = {signal.SIGTERM: 'SIGTERM', signal.SIGINT: 'Ctrl-C', signal.SIGHUP: 'SIGHUP'}

    def __init__(self, grace):
        self.grace, self.requested, self.saving = grace, False, False
        self.name = 'SIGTERM'   # the signal that stopped the run, as the messages say it
        self.done = threading.Event()

    def __enter__(self):
        self.previous = {s: signal.signal(s, self.on_sigterm) for s in self.SIGNALS}
        self.wake_r, wake_w = socket.socketpair()
        wake_w.setblocking(False)
        self.wake_w = wake_w
        self.previous_fd = signal.set_wakeup_fd(wake_w.fileno())
        self.heard = []   # the stop signals the watchdog has seen, in order
        threading.Thread(target=self.watch, daemon=True).start()
        self.children = set(multiprocessing.active_children())
        return self

    def __exit__(self, *exc):
        self.done.set()
        for s, previous in self.previous.items():
            signal.signal(s, previous)
        signal.set_wakeup_fd(self.previous_fd)
        # DataLoader workers still alive (an exception kept their iterator): multiprocessing
        # ends children at exit with SIGTERM, which they do not hear, and would wait forever.
        # SIGCHLD's default meanwhile: torch's handler would report them killed, as an error
        leftover = set(multiprocessing.active_children()) - self.children
        if leftover:
            previous = signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            for child in leftover:
                child.kill()
                child.join(5)
            signal.signal(signal.SIGCHLD, previous)
        self.wake_w.close()   # ends the watchdog's recv
        return False

    def on_sigterm(self, signum, frame):
        if not self.requested:
            self.name = self.SIGNALS.get(signum, 'SIGTERM')
        self.requested = True

    def watch(self):
        with self.wake_r:   # closed when __exit__ closes the other end
            while not self.done.is_set():
                woken = self.wake_r.recv(64)
                if not woken:
                    return
                self.on_wakeup(woken)

    def on_wakeup(self, woken):
        for signum in (s for s in woken if s in self.SIGNALS):
            if signum == signal.SIGINT and signal.SIGINT in self.heard:
                print('Ctrl-C again: exiting now, without saving', file=sys.stderr, flush=True)
                self.exit_now(130)
            if not self.heard:   # the first: the step must end within the grace period
                if signum == signal.SIGINT:
                    print('\nCtrl-C: saving at the end of this step, then exiting (Ctrl-C again '
                          'to exit at once, without saving)', file=sys.stderr, flush=True)
                threading.Thread(target=self.deadline, args=(self.SIGNALS[signum],),
                                 daemon=True).start()
            self.heard.append(signum)

    def deadline(self, name):
        if not self.done.wait(self.grace):
            while self.saving:   # a checkpoint being written is let finish
                time.sleep(0.1)
            if not self.done.is_set():
                print(f'{name}: the step did not end within --stop_grace={self.grace:g}s '
                      '(a peer rank is probably gone); exiting without saving',
                      file=sys.stderr, flush=True)
                self.exit_now(1)

    def exit_now(self, status):
        """os._exit, this run's DataLoader workers killed first: left alone, they would live on
        until they noticed the trainer gone (up to 5 s), holding memory and its output pipes."""
        for child in set(multiprocessing.active_children()) - self.children:
            child.kill()
        os._exit(status)

    @staticmethod
    def deaf_workers(batches):
        """The first batch, with the DataLoader workers (forked on that call) deaf to SIGTERM."""
        signal.pthread_sigmask(signal.SIG_BLOCK, set(Preemption.SIGNALS))
        try:
            return next(batches)
        finally:   # a signal that came meanwhile is delivered now
            signal.pthread_sigmask(signal.SIG_UNBLOCK, set(Preemption.SIGNALS))
