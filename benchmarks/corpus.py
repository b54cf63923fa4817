"""Offline real text for the sentence-embedding benchmarks, from what ships with the interpreter.

- Retrieval pairs: held-out standard-library docstrings (quality.py's evaluation modules and
  more), each split in half at its middle word; the first half must find its own second half
  among every pair's second half (recall@1). Pairs whose halves repeat another pair's (shared
  boilerplate) are dropped: a tie has no right answer.
- Calibration texts: docstrings of quality.py's calibration modules interleaved with passages of
  the Python language reference (pydoc_data.topics); no calibration module is a retrieval one.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection
from pydoc_data.topics import topics

import torch
from quality import CALIBRATION_MODULES, EVALUATION_MODULES, docstrings

#: evaluation modules first: the first evaluation texts are quality.py's
RETRIEVAL_MODULES = [
    *EVALUATION_MODULES,
    "os",
    "io",
    "socket",
    "asyncio",
    "pickle",
    "pickletools",
    "codecs",
    "contextlib",
    "heapq",
    "string",
    "hashlib",
    "smtplib",
    "ftplib",
    "imaplib",
    "poplib",
    "optparse",
    "locale",
    "platform",
    "sysconfig",
    "traceback",
    "warnings",
    "pstats",
    "timeit",
    "tokenize",
    "dis",
    "pkgutil",
    "runpy",
    "lzma",
    "base64",
    "mimetypes",
    "wave",
    "uuid",
    "ipaddress",
    "socketserver",
    "xmlrpc.client",
    "xmlrpc.server",
    "http.server",
    "http.cookiejar",
    "urllib.parse",
    "urllib.request",
    "concurrent.futures",
    "code",
    "shelve",
    "ssl",
    "filecmp",
    "fileinput",
    "compileall",
    "bdb",
    "xml.etree.ElementTree",
    "xml.sax",
    "email.message",
    "email.utils",
    "email.header",
    "unittest.mock",
    "importlib.metadata",
    "ctypes",
    "asyncio.base_events",
    "multiprocessing.managers",
    "sqlite3",
    "weakref",
    "abc",
    "sched",
    "gettext",
    "pdb",
    "cProfile",
    "glob",
    "fnmatch",
    "plistlib",
    "gzip",
    "bz2",
    "http.client",
    "http.cookies",
    "cmd",
    "graphlib",
    "selectors",
    "trace",
    "zipapp",
    "html.parser",
    "xml.dom.minidom",
    "pydoc",
    "pty",
    "array",
    "mmap",
    "zlib",
    "binascii",
]
PASSAGE_WORDS = 150  # about 200–250 MiniLM tokens: a passage fills most of a 256-token input


def _check_disjoint() -> None:
    shared = {m.split(".")[0] for m in CALIBRATION_MODULES} & {
        m.split(".")[0] for m in RETRIEVAL_MODULES
    }
    if shared:
        raise RuntimeError(f"modules {sorted(shared)} are both calibration and retrieval modules")


def halves(text: str) -> tuple[str, str]:
    """The text's words before and after its middle word."""
    words = text.split()
    middle = len(words) // 2
    return " ".join(words[:middle]), " ".join(words[middle:])


def retrieval_pairs(count: int, exclude: Collection[str]) -> list[tuple[str, str]]:
    """The first `count` (first half, second half) pairs of the retrieval docstrings not in
    `exclude` (the calibration texts), no half equal to another pair's."""
    _check_disjoint()
    excluded = set(exclude)
    pairs: list[tuple[str, str]] = []
    seen: set[str] = set()
    for text in docstrings(RETRIEVAL_MODULES):
        first, second = halves(text)
        if text in excluded or first in seen or second in seen:
            continue
        seen.update((first, second))
        pairs.append((first, second))
    if len(pairs) < count:
        raise RuntimeError(f"only {len(pairs)} retrieval pairs, asked for {count}")
    return pairs[:count]


def reference_passages(words: int = PASSAGE_WORDS) -> list[str]:
    """The Python language reference (pydoc_data.topics, by topic name) cut into passages of
    `words` words; a shorter remainder of under half that is dropped."""
    passages = []
    for name in sorted(topics):
        text = topics[name].split()
        for start in range(0, len(text), words):
            chunk = text[start : start + words]
            if len(chunk) >= words // 2:
                passages.append(" ".join(chunk))
    return passages


def calibration_texts(count: int) -> list[str]:
    """`count` texts: calibration-module docstrings and language-reference passages, alternating
    while both last."""
    _check_disjoint()
    sources = [docstrings(CALIBRATION_MODULES), reference_passages()]
    mixed = [t for pair in itertools.zip_longest(*sources) for t in pair if t is not None]
    if len(mixed) < count:
        raise RuntimeError(f"only {len(mixed)} calibration texts, asked for {count}")
    return mixed[:count]


def recall_at_1(queries: torch.Tensor, documents: torch.Tensor) -> float:
    """Fraction of queries i whose most cosine-similar document is document i."""
    queries = torch.nn.functional.normalize(queries.float(), dim=-1)
    documents = torch.nn.functional.normalize(documents.float(), dim=-1)
    best = (queries @ documents.T).argmax(-1)
    return (best == torch.arange(len(queries))).float().mean().item()
