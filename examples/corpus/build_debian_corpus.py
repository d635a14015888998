#!/usr/bin/env python3
"""Build the Debian package-description demo corpus for embedding search.

The embedding-search demo needs a real, public, reproducible set of short texts. Debian's
package index is a good fit: every package carries a one-line synopsis written by a human
to say what the package is for, it is freely redistributable, and a copy of the index is
already on any Debian machine that has run ``apt-get update``.

Raw, the index is a poor search corpus, so this script filters it. Each rule exists because
the packages it removes would make search results look broken or repetitive, not because
they are uninteresting packages:

* **Debug symbols** (``-dbg``, ``-dbgsym`` or ``Section: debug``): the synopsis repeats the
  parent package's with "debugging symbols" appended, so queries would return the pair.
* **Development files** (``-dev``): usually "<library> - development files"; a
  near-copy of the runtime library's text. This also removes the nearly 2,000 each of
  ``librust-*-dev`` and ``golang-*-dev`` source packages, which would otherwise dominate.
* **Documentation** (``-doc`` or ``-doc-<variant>``, e.g. ``-doc-en``, ``-doc-html``): the
  synopsis is the parent's plus "(documentation)".
* **Haskell profiling libraries** (``-prof``): the third copy of each ``libghc-*`` text
  ("...; profiling libraries"), after ``-dev`` and ``-doc``.
* **Transitional and dummy packages**: empty packages kept only for upgrades; their text
  ("transitional dummy package") describes nothing.
* **Cross-build libraries** (``-<debian-arch>-cross``, e.g. ``libc6-arm64-cross``): sysroot
  copies of native libraries whose synopsis duplicates the native package's.
* **Too short**: a synopsis of a single word (e.g. ``task-gnome-desktop``: "GNOME") is not
  a description to search.
* **Language-pack families**: one package per language for the same thing (``*-l10n-xx``,
  ``hunspell-xx``, ``hyphen-xx``, ``tesseract-ocr-xxx``, ``dict-freedict-xxx-yyy``,
  ``apertium-xxx-yyy``, ``libreoffice-help-xx``, language ``task-*`` packages, ...). These
  differ only in the language name, so one query ("spell checking dictionary") would fill
  the results with the same sentence. Each family is collapsed to one member.
* **Cross-toolchain families**: ``gcc``, ``g++``, ``binutils`` and friends are built once per
  target triplet (``*-aarch64-linux-gnu``, ``*-mips64el-linux-gnuabi64``, ...) and for
  MinGW-w64 targets; each tool is collapsed to one member for the same reason.
* **Near-duplicates**: after normalising Unicode (NFKC), case, punctuation, whitespace and
  digit runs, identical synopses are kept once. Masking digits merges version series such
  as "Qt 5 network module" / "Qt 6 network module" or GTK2/GTK3 variants, which are the
  same text to a reader; it occasionally merges two genuinely different packages (IPv4 vs
  IPv6 DHCP servers), which is an acceptable loss for a demo.

Firmware is not special-cased: ``main`` in bookworm holds only a handful of ``firmware-*``
packages (the bulk lives in ``non-free-firmware``), so they do not flood the set.

Whenever a rule keeps one package out of several (families, near-duplicates), the kept one
is the first by (name length, name): the shortest name is usually the canonical package
(``adwaita-qt`` over ``adwaita-qt6``), and the tie-break makes the choice independent of
the index's stanza order.

From the remaining candidates, exactly ``--count`` records are chosen by sorting on a
salted SHA-256 of the package name and taking the first ones. A hash ordering, rather than
taking every n-th name, means whether a package is chosen depends only on its own name and
rank, so a slightly newer index changes only a few records instead of shifting every
pick. The output is sorted by package name and written with fixed JSON settings, so the
same index always yields a byte-identical file.

Example:
    python3 examples/corpus/build_debian_corpus.py
    python3 examples/corpus/build_debian_corpus.py --packages Packages.xz --output /tmp/c.jsonl
"""

from __future__ import annotations

import argparse
import bz2
import collections
import gzip
import hashlib
import json
import lzma
import re
import shutil
import subprocess
import sys
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

DEFAULT_COUNT = 20_000
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "debian-packages.jsonl"
APT_LISTS_DIR = Path("/var/lib/apt/lists")
INDEX_GLOB = "*_dists_bookworm_main_binary-amd64_Packages*"
# Changing the salt changes which packages are sampled; bump it only deliberately.
SAMPLE_SALT = "tritonop-debian-corpus-v1"
# The order in which the summary lists skip reasons: outright skips in the order they are
# tested, then the collapsing steps in the order they run.
_REASON_ORDER = {
    reason: rank
    for rank, reason in enumerate(
        (
            "debug symbols",
            "development files (-dev)",
            "documentation (-doc)",
            "profiling libraries (-prof)",
            "no description",
            "transitional/dummy",
            "cross-build library (-<arch>-cross)",
            "too short (one word)",
            "language-pack family collapsed",
            "cross-toolchain family collapsed",
            "near-duplicate description",
            "not sampled",
        )
    )
}

# Debian architecture names as they appear in ``<lib>-<arch>-cross`` package names. Listing
# them (rather than matching any ``-cross`` suffix) keeps real tools such as ``dpkg-cross``.
_DEBIAN_ARCHES = (
    "alpha|amd64|arc|arm64|armel|armhf|hppa|i386|ia64|loong64|m68k|"
    r"mips(?:64|n32)?(?:r6)?(?:el)?|powerpc|ppc64|ppc64el|riscv64|s390x|sh4|sparc64|x32"
)
_CROSS_LIB_RE = re.compile(rf"-(?:{_DEBIAN_ARCHES})-cross$")

_TRANSITIONAL_RES = (
    # "transitional package", "Transition package, foo to elpa-foo", "transitional dummy".
    re.compile(r"\btransition(?:al|nal)?\b.*\b(?:package|dummy)\b", re.IGNORECASE),
    re.compile(r"\b(?:package|dummy)\b.*\btransition(?:al|nal)?\b", re.IGNORECASE),
    # "dummy package", "(essential components, dummy package)", "[dummy package]".
    re.compile(r"\bdummy\b[\w\s,-]*\bpackage\b", re.IGNORECASE),
    # "XSL module for PHP (dummy)".
    re.compile(r"\(dummy\)", re.IGNORECASE),
)

# Per-language package families, each matched on the name; group "family" names the family.
_LANGUAGE_FAMILY_RES = (
    # A fixed prefix and a language or locale code, optionally with a variant: "hunspell-de",
    # "firefox-esr-l10n-pt-br", "tesseract-ocr-chi-sim", "hunspell-de-ch-frami".
    re.compile(
        r"^(?P<family>"
        r".+-l10n"
        r"|aspell|asterisk-core-sounds|debian-reference|gimp-help|hunspell|hyphen"
        r"|libreoffice-help|maint-guide|manpages|myspell|mythes|tesseract-ocr"
        r"|ubuntu-packaging-guide-(?:epub|html|pdf)"
        r")-[a-z]{2,3}(?:[-_][a-z0-9]{2,8})*$"
    ),
    # Tesseract's per-script data, named by ISO 15924 code: "tesseract-ocr-script-latn".
    re.compile(r"^(?P<family>tesseract-ocr-script)-[a-z]{4}(?:-vert)?$"),
    # Language pairs: "apertium-eng-cat", "dict-freedict-afr-deu". Only pairs match, so tools
    # in the same namespace ("apertium-apy", "apertium-lex-tools") are kept.
    re.compile(r"^(?P<family>apertium|dict-freedict)-[a-z]{2,3}-[a-z]{2,3}$"),
)
# Debian's per-language installer tasks: "task-thai" ("Thai environment"), "task-thai-desktop"
# ("Thai desktop"), "task-thai-kde-desktop" ("Thai KDE Plasma desktop"), and so on. A task is
# taken as a language task when its synopsis has that shape and mentions the word that
# starts the name's stem ("thai", "chinese" in "task-chinese-s"); that excludes
# "task-desktop" ("Debian desktop environment") without listing languages.
_LANGUAGE_TASK_RE = re.compile(
    r"^(?P<language>[A-Z][\w()' -]*?) "
    r"(?P<kind>environment|(?:KDE Plasma |GNOME |GNOME Flashback )?desktop)(?: environment)?$"
)
_TASK_KIND_SUFFIX_RE = re.compile(r"(?:^|-)(?:(?:kde|gnome|gnome-flashback)-)?desktop$")
# Cross compilers and binutils per GNU target triplet, and per MinGW-w64 target.
_TRIPLET_RE = re.compile(r"-linux-gnu[a-z0-9]*$")
_MINGW_RE = re.compile(r"^(?P<tool>.+?)-mingw-w64-(?:i686|x86-64)(?:-.+)?$")

_NON_WORD_RE = re.compile(r"[\W_]+")
_DIGITS_RE = re.compile(r"\d+")
_WHITESPACE_RE = re.compile(r"\s+")


@dataclass(frozen=True)
class Package:
    """One binary package from the index, reduced to what the corpus needs.

    Attributes:
        name: The ``Package:`` field.
        section: The ``Section:`` field, or an empty string when absent.
        synopsis: The first line of ``Description:``, whitespace-collapsed.
    """

    name: str
    section: str
    synopsis: str


def find_default_index(lists_dir: Path = APT_LISTS_DIR) -> Path:
    """Locate the bookworm main amd64 ``Packages`` index that apt has downloaded.

    Apt names list files after the mirror URL and picks the compression per machine, so
    the exact file name is not fixed; a glob over the lists directory finds it either way.

    Args:
        lists_dir: Apt's lists directory.

    Returns:
        The first matching index file, by name, so the choice is stable.

    Raises:
        FileNotFoundError: If no matching index exists (run ``apt-get update`` or pass
            ``--packages``).
    """
    candidates = sorted(
        p for p in lists_dir.glob(INDEX_GLOB) if p.is_file() and "diff_Index" not in p.name
    )
    if not candidates:
        raise FileNotFoundError(
            f"no {INDEX_GLOB} under {lists_dir}; run apt-get update or pass --packages"
        )
    return candidates[0]


def _decompress_with_tool(path: Path) -> bytes:
    """Decompress an lz4/zstd index with apt's own helper, falling back to the CLI tools.

    Python's standard library has no lz4 or zstd codec, and apt stores its lists as lz4 on
    current Debian. ``apt-helper cat-file`` reads whatever apt wrote, so it is tried first.

    Args:
        path: The compressed index.

    Returns:
        The decompressed bytes.

    Raises:
        RuntimeError: If no tool that can read the file is installed.
    """
    commands: list[list[str]] = []
    apt_helper = Path("/usr/lib/apt/apt-helper")
    if apt_helper.exists():
        commands.append([str(apt_helper), "cat-file", str(path)])
    tool = "lz4" if path.suffix == ".lz4" else "zstd"
    if shutil.which(tool):
        commands.append([tool, "-dc", str(path)])
    for command in commands:
        result = subprocess.run(command, capture_output=True, check=False)
        if result.returncode == 0:
            return result.stdout
    raise RuntimeError(f"cannot decompress {path}: need /usr/lib/apt/apt-helper or {tool}")


def read_index_text(path: Path) -> str:
    """Read a ``Packages`` index, plain or compressed, as text.

    Args:
        path: A plain, ``.gz``, ``.xz``, ``.bz2``, ``.lz4`` or ``.zst`` index file.

    Returns:
        The index as a UTF-8 string (Debian control data is UTF-8 by policy).
    """
    openers: dict[str, Callable[[Path], bytes]] = {
        ".gz": lambda p: gzip.decompress(p.read_bytes()),
        ".xz": lambda p: lzma.decompress(p.read_bytes()),
        ".lzma": lambda p: lzma.decompress(p.read_bytes()),
        ".bz2": lambda p: bz2.decompress(p.read_bytes()),
        ".lz4": _decompress_with_tool,
        ".zst": _decompress_with_tool,
    }
    opener = openers.get(path.suffix, lambda p: p.read_bytes())
    return opener(path).decode("utf-8")


def iter_stanzas(text: str) -> Iterator[dict[str, str]]:
    """Split a deb822 document into stanzas of field name to first-line value.

    Only each field's first line is kept: the corpus needs the synopsis, which is the first
    line of ``Description:``, and no other multi-line field.

    Args:
        text: The whole index.

    Yields:
        One dict per stanza that has at least one field.
    """
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                yield fields
                fields = {}
        elif line[0] in " \t" or line.startswith("#"):
            continue  # Continuation line of a multi-line field (or a comment).
        else:
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
    if fields:
        yield fields


def parse_packages(text: str) -> tuple[list[Package], int]:
    """Turn index text into packages, one per name.

    A name can appear in several stanzas (bookworm lists two versions of ``linux-doc``);
    the first stanza wins, and the others are counted.

    Args:
        text: The whole index.

    Returns:
        The packages in index order, and the number of stanzas read.
    """
    packages: dict[str, Package] = {}
    stanzas = 0
    for fields in iter_stanzas(text):
        name = fields.get("Package")
        if not name:
            continue
        stanzas += 1
        if name in packages:
            continue
        synopsis = _WHITESPACE_RE.sub(" ", fields.get("Description", "")).strip()
        packages[name] = Package(name, fields.get("Section", ""), synopsis)
    return list(packages.values()), stanzas


def skip_reason(pkg: Package) -> str | None:
    """Say why a package is dropped outright, or ``None`` when it is a candidate.

    Args:
        pkg: The package.

    Returns:
        A short reason label, used in the summary.
    """
    name = pkg.name
    if name.endswith(("-dbg", "-dbgsym")) or pkg.section == "debug":
        return "debug symbols"
    if name.endswith("-dev"):
        return "development files (-dev)"
    if name.endswith("-doc") or "-doc-" in name:
        return "documentation (-doc)"
    if name.endswith("-prof"):
        return "profiling libraries (-prof)"
    if not pkg.synopsis:
        return "no description"
    if any(regex.search(pkg.synopsis) for regex in _TRANSITIONAL_RES):
        return "transitional/dummy"
    if _CROSS_LIB_RE.search(name):
        return "cross-build library (-<arch>-cross)"
    if len(pkg.synopsis.split()) < 2:
        return "too short (one word)"
    return None


def family_key(pkg: Package) -> tuple[str, str] | None:
    """Name the variant family a package belongs to, if any.

    Args:
        pkg: A candidate package.

    Returns:
        ``(reason, family)`` for packages in a per-language or per-target family, where all
        packages with the same pair collapse to one; ``None`` otherwise.
    """
    name = pkg.name
    for regex in _LANGUAGE_FAMILY_RES:
        if match := regex.match(name):
            return "language-pack family collapsed", match["family"]
    if name.startswith("task-") and (match := _LANGUAGE_TASK_RE.match(pkg.synopsis)):
        stem = _TASK_KIND_SUFFIX_RE.sub("", name.removeprefix("task-"))
        language_words = match["language"].casefold().split()
        if stem and stem.split("-", 1)[0] in language_words:
            return "language-pack family collapsed", f"task/{match['kind']}"
    if _TRIPLET_RE.search(name):
        return "cross-toolchain family collapsed", name.split("-", 1)[0]
    if match := _MINGW_RE.match(name):
        return "cross-toolchain family collapsed", f"{match['tool']}-mingw-w64"
    return None


def normalize(synopsis: str) -> str:
    """Reduce a synopsis to a key under which near-identical texts compare equal.

    Args:
        synopsis: The synopsis.

    Returns:
        The NFKC-normalised, case-folded text with punctuation and whitespace collapsed
        to single spaces and every digit run replaced by ``0``.
    """
    text = unicodedata.normalize("NFKC", synopsis).casefold()
    text = _NON_WORD_RE.sub(" ", text)
    return _DIGITS_RE.sub("0", text).strip()


def _preference(pkg: Package) -> tuple[int, str]:
    """Order packages so the shortest (usually canonical) name comes first."""
    return len(pkg.name), pkg.name


def _keep_first(
    packages: Iterable[Package], key: Callable[[Package], object]
) -> tuple[list[Package], list[Package]]:
    """Keep the preferred package for each key and return the others separately.

    Args:
        packages: Packages to thin out.
        key: Maps a package to its group; ``None`` means "never grouped".

    Returns:
        The kept packages, and the dropped ones.
    """
    seen: set[object] = set()
    kept: list[Package] = []
    dropped: list[Package] = []
    for pkg in sorted(packages, key=_preference):
        group = key(pkg)
        if group is None:
            kept.append(pkg)
        elif group in seen:
            dropped.append(pkg)
        else:
            seen.add(group)
            kept.append(pkg)
    return kept, dropped


def sample_key(name: str) -> str:
    """Give a package its stable pseudo-random rank for sampling.

    Args:
        name: The package name.

    Returns:
        A hex digest; sorting by it is a fixed shuffle.
    """
    return hashlib.sha256(f"{SAMPLE_SALT}:{name}".encode()).hexdigest()


def build_corpus(
    packages: list[Package], count: int
) -> tuple[list[Package], collections.Counter[str]]:
    """Filter, collapse, deduplicate and sample packages into the corpus.

    Args:
        packages: All packages from the index, one per name.
        count: Exactly how many records to return.

    Returns:
        The chosen packages sorted by name, and the number dropped per reason.

    Raises:
        ValueError: If fewer than ``count`` packages survive the filters.
    """
    skipped: collections.Counter[str] = collections.Counter()
    candidates: list[Package] = []
    for pkg in packages:
        reason = skip_reason(pkg)
        if reason is None:
            candidates.append(pkg)
        else:
            skipped[reason] += 1

    candidates, dropped = _keep_first(candidates, family_key)
    for pkg in dropped:
        family = family_key(pkg)
        if family is not None:  # Always true: only packages in a family are dropped here.
            skipped[family[0]] += 1

    candidates, dropped = _keep_first(candidates, lambda pkg: normalize(pkg.synopsis))
    skipped["near-duplicate description"] += len(dropped)

    if len(candidates) < count:
        raise ValueError(f"only {len(candidates)} packages survive the filters; need {count}")
    chosen = sorted(candidates, key=lambda pkg: sample_key(pkg.name))[:count]
    skipped["not sampled"] += len(candidates) - count
    return sorted(chosen, key=lambda pkg: pkg.name), skipped


def write_jsonl(packages: Iterable[Package], output: Path) -> int:
    """Write the corpus as JSON Lines with fixed formatting, for byte-identical rebuilds.

    Args:
        packages: The records, already in output order.
        output: Destination file; its directory is created if needed.

    Returns:
        The number of bytes written.
    """
    lines = [
        json.dumps({"package": pkg.name, "text": pkg.synopsis}, ensure_ascii=False) + "\n"
        for pkg in packages
    ]
    data = "".join(lines).encode("utf-8")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(output)
    return len(data)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line.

    Args:
        argv: Arguments without the program name; ``None`` means ``sys.argv[1:]``.

    Returns:
        The parsed arguments.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--packages",
        type=Path,
        help=f"Packages index (plain, .gz, .xz, .bz2, .lz4, .zst); default: {INDEX_GLOB} "
        f"under {APT_LISTS_DIR}",
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSONL file to write")
    parser.add_argument("--count", type=int, default=DEFAULT_COUNT, help="exact number of records")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Build the corpus and print a summary.

    Args:
        argv: Command-line arguments; ``None`` means ``sys.argv[1:]``.

    Returns:
        The process exit status.
    """
    args = parse_args(argv)
    try:
        index = args.packages or find_default_index()
        packages, stanzas = parse_packages(read_index_text(index))
        chosen, skipped = build_corpus(packages, args.count)
    except (OSError, RuntimeError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    size = write_jsonl(chosen, args.output)

    print(f"index:    {index}")
    print(f"read:     {stanzas} stanzas, {len(packages)} distinct packages")
    for reason, number in sorted(skipped.items(), key=lambda item: _REASON_ORDER[item[0]]):
        print(f"skipped:  {number:6d}  {reason}")
    print(f"written:  {len(chosen)} records, {size} bytes -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
