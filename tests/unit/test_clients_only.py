"""gRPC channels, Redis and kazoo clients are constructed only in ``services/core/clients.py``,
so TLS, auth and timeouts land in one place: no other module of services/ or benchmarks/ calls
a constructor of theirs (code only: strings and comments are not calls)."""

import io
import pathlib
import tokenize

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONSTRUCTORS = {"insecure_channel", "secure_channel", "KazooClient", "Redis", "from_url"}
ALLOWED = {"services/core/clients.py"}


def constructor_calls(source: str) -> list[tuple[int, str]]:
    """(line, name) of every ``NAME(`` in ``source`` whose name is a client constructor."""
    found = []
    tokens = [t for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type not in (tokenize.NL, tokenize.COMMENT)]
    for tok, nxt in zip(tokens, tokens[1:]):
        if tok.type == tokenize.NAME and tok.string in CONSTRUCTORS and nxt.type == tokenize.OP and nxt.string == "(":
            found.append((tok.start[0], tok.string))
    return found


def test_constructor_calls_finds_calls_not_strings():
    src = 'a = grpc.aio.insecure_channel(x)\nb = redis.Redis.from_url(u)\nprint("grpc.insecure_channel(x)")  # Redis(\n'
    assert constructor_calls(src) == [(1, "insecure_channel"), (2, "from_url")]


def test_clients_are_constructed_only_in_core_clients():
    offenders = []
    for top in ("services", "benchmarks"):
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel.startswith("services/_proto/") or rel in ALLOWED:
                continue
            offenders += [f"{rel}:{line}: {name}(" for line, name in constructor_calls(path.read_text(encoding="utf-8"))]
    assert not offenders, "construct clients through services/core/clients.py:\n" + "\n".join(offenders)
