# The resident runner of a Docker project container (see sandbox/runner.rs): started once by
# the bridge as `python3 -I -S -c THIS_TEXT SOCKET`, it listens on SOCKET and starts each run
# the bridge asks for, one connection per run, then kills every other process of its uid.
#
# Frames both ways: kind (1 byte), length (4 bytes, big endian), payload.
#   bridge -> runner: b"R" argv joined by NUL (first frame), b"I" stdin bytes, b"E" end of stdin;
#                     the end of the connection means "kill the run".
#   runner -> bridge: b"s" started, b"f" failed to start (message), b"o" stdout, b"e" stderr,
#                     b"x" exit: the status as sh reports it (4 bytes), once every leftover is dead.
import ctypes
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys

OUT_HIGH = 256 << 10
IN_HIGH = 1 << 20
CHUNK = 64 << 10


def kill_the_rest():
    # kill(-1) reaches every process this uid may signal in the container's pid namespace,
    # except the caller: every process of the run, and nothing of the runner.
    try:
        os.kill(-1, signal.SIGKILL)
    except ProcessLookupError:
        pass


def frame(kind, payload=b""):
    return kind + struct.pack(">I", len(payload)) + payload


def read_exact(conn, n):
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def serve(conn):
    head = read_exact(conn, 5)
    if head is None or head[:1] != b"R":
        return
    payload = read_exact(conn, struct.unpack(">I", head[1:])[0])
    if payload is None:
        return
    argv = payload.split(b"\0")
    try:
        child = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/workspace", bufsize=0
        )
    except OSError as err:
        conn.sendall(frame(b"f", str(err).encode()))
        return
    try:
        run(conn, child)
    finally:
        kill_the_rest()
        child.wait()


def run(conn, child):
    conn.setblocking(False)
    pidfd = os.pidfd_open(child.pid)
    pipes = {child.stdout.fileno(): b"o", child.stderr.fileno(): b"e"}
    stdin = child.stdin.fileno()
    for fd in [*pipes, stdin]:
        os.set_blocking(fd, False)
    sel = selectors.DefaultSelector()
    sel.register(pidfd, selectors.EVENT_READ, "exit")
    out, inbuf, pending = bytearray(frame(b"s")), bytearray(), bytearray()
    stdin_end, stdin_open, exited = False, True, False
    # The bridge sends until it wants the run killed, and reads until it is gone.
    bridge_sends, bridge_open = True, True

    def want(fd, events):
        try:
            sel.modify(fd, events) if events else sel.unregister(fd)
        except KeyError:
            if events:
                sel.register(fd, events)

    # Until the program has ended, its leftovers are dead, its output is closed and sent (or
    # the bridge is gone).
    while not (exited and not pipes and (not out or not bridge_open)):
        if not bridge_open:
            out.clear()
        want(conn, (selectors.EVENT_READ if bridge_sends and len(pending) < IN_HIGH else 0)
             | (selectors.EVENT_WRITE if out else 0))
        for fd in pipes:
            want(fd, selectors.EVENT_READ if len(out) < OUT_HIGH else 0)
        if stdin_open:
            want(stdin, selectors.EVENT_WRITE if pending else 0)
        for key, events in sel.select():
            fd = key.fd
            if key.data == "exit":
                sel.unregister(pidfd)
                exited = True
                kill_the_rest()
            elif fd == conn.fileno() and events & selectors.EVENT_WRITE:
                try:
                    del out[: conn.send(out)]
                except BlockingIOError:
                    pass
                except OSError:
                    bridge_open = False
            elif fd == conn.fileno():
                try:
                    data = conn.recv(CHUNK)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    # The bridge wants the run stopped (or is gone).
                    bridge_sends = False
                    kill_the_rest()
                    continue
                inbuf += data
                while len(inbuf) >= 5:
                    size = struct.unpack(">I", inbuf[1:5])[0]
                    if len(inbuf) < 5 + size:
                        break
                    kind, body = bytes(inbuf[:1]), bytes(inbuf[5 : 5 + size])
                    del inbuf[: 5 + size]
                    if kind == b"I" and stdin_open and not stdin_end:
                        pending += body
                    elif kind == b"E":
                        stdin_end = True
            elif fd == stdin:
                try:
                    del pending[: os.write(stdin, pending)]
                except BlockingIOError:
                    pass
                except OSError:
                    pending.clear()
                    stdin_end = True
            elif fd in pipes:
                try:
                    data = os.read(fd, CHUNK)
                except BlockingIOError:
                    continue
                if data:
                    out += frame(pipes[fd], data)
                else:
                    sel.unregister(fd)
                    del pipes[fd]
        if stdin_open and stdin_end and not pending:
            want(stdin, 0)
            child.stdin.close()
            stdin_open = False
    os.close(pidfd)
    kill_the_rest()
    code = child.wait()
    if bridge_open:
        conn.setblocking(True)
        try:
            conn.sendall(bytes(out) + frame(b"x", struct.pack(">i", code if code >= 0 else 128 - code)))
        except OSError:
            pass


def main():
    path = sys.argv[1]
    # Not dumpable: a process of the same uid (a run) can neither ptrace this one nor open its
    # /proc/PID/mem or /proc/PID/fd. It can still signal it; the bridge notices.
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(4, 0, 0, 0, 0) != 0:  # PR_SET_DUMPABLE, 0
        sys.exit("prctl(PR_SET_DUMPABLE) failed")
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(4)
    while True:
        conn, _ = listener.accept()
        try:
            serve(conn)
        except Exception as err:  # noqa: BLE001 - one bad run must not end the runner
            print("runner:", repr(err), file=sys.stderr)
            kill_the_rest()
        finally:
            conn.close()


main()
