"""Redaction cost: 64 KiB of tool output through the Redactor vs a plain `str.replace`.

    python -m bench.redaction [--runs 200]

The text is ordinary on-call output (web and ssh logs, git shas, image digests,
uuids, IPv6 neighbours, pod lists, `ls -l`), 64 KiB like the shell tool's
output cap; a second text has 25 secrets of every kind spread through it. The
Redactor holds the literals a fully configured bot has (Slack, Matrix, model
key). Each run redacts a distinct text, so the cache of already-clean output
never answers; its own cost (the same text recorded again in an event) is
printed separately. Times are the thread's CPU time (on a loaded machine wall
time also waits for a core; it is printed too). The baseline is one
`str.replace` of the bot token over the same text: the least any literal
redaction could cost. Target: a few ms per 64 KiB (p50 at most 5 ms).
"""

from __future__ import annotations

import argparse
import hashlib
import random
import secrets
import statistics
import string
import time
import uuid
from collections.abc import Callable

from bench._common import print_header, verdict
from runtime.tools.redaction import Redactor

SIZE = 64 * 1024
ALNUM = string.ascii_letters + string.digits


def ordinary_log(seed: int, size: int = SIZE) -> str:
    rng = random.Random(seed)
    lines: list[str] = [f"# run {seed}"]
    total = 0
    i = 0
    while total < size:
        i += 1
        sha = hashlib.sha256(f"{seed}-{i}".encode()).hexdigest()
        line = rng.choice(
            [
                f"2026-12-01T21:{i % 60:02d}:{i % 60:02d}.{i % 1000:03d}Z web-{i % 5} nginx: "
                f'10.0.{i % 255}.{i % 7} "GET /api/v1/orders/{uuid.uuid4()} HTTP/1.1" 200 {i * 37}',
                f"Dec  1 21:{i % 60:02d}:07 db-2 sshd[{i}]: Failed password for invalid user "
                f"admin from 203.0.113.{i % 255} port {40000 + i} ssh2",
                f"commit {hashlib.sha1(sha.encode()).hexdigest()} (HEAD -> main, origin/main)",
                f"sha256:{sha}  registry.example.com/ops/api@sha256:{sha[:12]}",
                f"fe80::{i % 9999:x}:1ff:fe23:4567 dev eth0 lladdr 52:54:00:{i % 256:02x}:4e:8a",
                f"api-7d9c{i % 10}b5f4-x{i % 7}k2p   1/1   Running   0   {i % 50}d   10.244.1.{i}",
                f"-rw-r--r-- 1 deploy deploy {i * 11} Dec  1 21:07 release-{i}.tar.gz",
                "pwd: /srv/app   key rotation scheduled; password policy: min length 12",
            ]
        )
        lines.append(line)
        total += len(line) + 1
    return "\n".join(lines)[:size]


def secrets_sprinkled(text: str, literals: dict[str, str]) -> str:
    rng = random.Random(len(text))
    found = [
        "AKIA" + "".join(rng.choice(string.ascii_uppercase + string.digits) for _ in range(16)),
        "ghp_" + "".join(rng.choice(ALNUM) for _ in range(36)),
        "glpat-" + "".join(rng.choice(ALNUM) for _ in range(20)),
        "xoxb-1234567890-" + "".join(rng.choice(ALNUM) for _ in range(24)),
        "password=" + "".join(rng.choice(ALNUM) for _ in range(12)),
        "https://deploy:hunter22@git.example.com/x.git",
        "Authorization: Bearer " + "".join(rng.choice(ALNUM) for _ in range(40)),
        "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIG2CkQ0n\n-----END PRIVATE KEY-----",
        *literals.values(),
    ]
    lines = text.split("\n")
    for n in range(25):
        lines.insert(rng.randrange(len(lines)), found[n % len(found)])
    return "\n".join(lines)


def timed(fn: Callable[[], object]) -> float:
    """CPU time of this thread: the cost itself, not the wait for a core on a
    loaded machine (wall time is printed too, for context)."""
    start = time.thread_time()
    fn()
    return time.thread_time() - start


def wall(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    print_header("redaction of 64 KiB tool output")

    literals = {
        "SLACK_BOT_TOKEN": "xoxb-" + secrets.token_hex(20),
        "SLACK_APP_TOKEN": "xapp-1-A0-" + secrets.token_hex(24),
        "SLACK_SIGNING_SECRET": secrets.token_hex(16),
        "MATRIX_PASSWORD": secrets.token_urlsafe(18),
        "MATRIX_ACCESS_TOKEN": "syt_" + secrets.token_urlsafe(30),
        "DUCKLM_MODEL_API_KEY": "sk-" + secrets.token_urlsafe(36),
    }
    redactor = Redactor(literals)
    token = literals["SLACK_BOT_TOKEN"]
    texts = [ordinary_log(seed) for seed in range(args.runs)]
    dirty = [secrets_sprinkled(text, literals) for text in texts[: max(1, args.runs // 4)]]

    for text in texts[:5]:  # warm up (regex compilation, caches)
        redactor.redact(text + "warm")
    plain = [timed(lambda t=text: t.replace(token, "[REDACTED]")) for text in texts]
    ours = [timed(lambda t=text: redactor.redact(t)) for text in texts]
    again = [timed(lambda t=text: redactor.redact(t)) for text in texts[-20:]]
    with_secrets = [timed(lambda t=text: redactor.redact(t)) for text in dirty]
    fresh = [ordinary_log(args.runs + seed) for seed in range(20)]
    ours_wall = [wall(lambda t=text: redactor.redact(t)) for text in fresh]
    counts = {redactor.redact(text + " ").count for text in texts[:20]}
    assert counts == {0}, f"false positives in ordinary text: {counts}"

    p50_plain = statistics.median(plain)
    p50_ours = statistics.median(ours)
    print(f"   literals held: {redactor.literal_count} (the bot's credentials and encodings)")
    print(f"   str.replace, one literal     p50 {p50_plain * 1e3:8.3f} ms")
    print(
        f"   Redactor, ordinary text      p50 {p50_ours * 1e3:8.3f} ms  max {max(ours) * 1e3:.3f}"
    )
    print(f"   Redactor, 25 secrets in it   p50 {statistics.median(with_secrets) * 1e3:8.3f} ms")
    print(f"   Redactor, same text again    p50 {statistics.median(again) * 1e3:8.3f} ms (cached)")
    print(f"   Redactor, ordinary, wall     p50 {statistics.median(ours_wall) * 1e3:8.3f} ms")
    print(f"   ratio Redactor / str.replace: {p50_ours / p50_plain:.0f}x")
    print(f"   target p50 <= 5 ms per 64 KiB: {verdict(p50_ours <= 0.005)}")


if __name__ == "__main__":
    main()
