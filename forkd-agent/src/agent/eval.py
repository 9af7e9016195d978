# A forkd code context (forkd-agent/src/agent/eval.rs): one long-lived interpreter that runs
# the snippets the agent sends on fd 0 in one namespace and answers on fd 3. The snippets' own
# output goes to fds 1 and 2, which the agent streams. Frames on both sides: a 4-byte
# big-endian length, then records of a 1-byte key, a 4-byte big-endian length and the bytes.
import ast, json, os, signal, struct, sys, time, traceback


def _forkd_context():
    requests = os.fdopen(os.dup(0), "rb", buffering=0)
    replies = os.fdopen(3, "wb", buffering=0)
    os.set_inheritable(requests.fileno(), False)
    os.set_inheritable(3, False)
    # Snippets (and their subprocesses) must not read the agent's requests.
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)

    def send(**fields):
        body = b""
        for key, value in fields.items():
            data = value if isinstance(value, bytes) else str(value).encode("utf-8", "replace")
            body += key.encode() + struct.pack(">I", len(data)) + data
        replies.write(struct.pack(">I", len(body)) + body)

    def read_exact(n):
        data = b""
        while len(data) < n:
            chunk = requests.read(n - len(data))
            if not chunk:
                return None
            data += chunk
        return data

    def receive():
        head = read_exact(4)
        body = head and read_exact(struct.unpack(">I", head)[0])
        if body is None:
            return None
        fields, i = {}, 0
        while i + 5 <= len(body):
            size = struct.unpack(">I", body[i + 1 : i + 5])[0]
            fields[chr(body[i])] = body[i + 5 : i + 5 + size]
            i += 5 + size
        return fields

    running = [False]

    def interrupt(signum, frame):
        # Only a snippet is interrupted (a timeout); between snippets SIGINT does nothing.
        if running[0]:
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupt)
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    send(t="ready", p=os.getpid(), V=sys.version.split()[0])
    while True:
        message = receive()
        if message is None:
            return
        source = message.get("c", b"").decode("utf-8", "replace")
        started = time.monotonic()
        reply = {}
        try:
            tree = ast.parse(source, "<eval>", "exec")
            last = None
            if tree.body and isinstance(tree.body[-1], ast.Expr):
                last = ast.Expression(tree.body.pop().value)
            running[0] = True
            try:
                exec(compile(tree, "<eval>", "exec"), namespace)
                value = eval(compile(last, "<eval>", "eval"), namespace) if last is not None else None
            finally:
                running[0] = False
            if value is not None:
                namespace["_"] = value
                try:
                    reply["v"] = repr(value)
                except BaseException as e:
                    reply["v"] = "<repr failed: %r>" % (e,)
                try:
                    reply["j"] = json.dumps(value)
                except BaseException:
                    pass
        except BaseException as e:
            running[0] = False
            tb = e.__traceback__
            # Only the snippet's frames: drop this loop's.
            while tb is not None and tb.tb_frame.f_code.co_filename != "<eval>":
                tb = tb.tb_next
            reply["n"] = type(e).__name__
            reply["m"] = str(e)
            reply["b"] = "".join(traceback.format_exception(type(e), e, tb))
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:
                pass
        reply["d"] = "%.3f" % ((time.monotonic() - started) * 1000)
        send(t="result", **reply)


_forkd_context()
