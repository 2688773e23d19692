"""`splice library`: keep adapters for one base model in a folder (add, list, show, rm, rename)."""

from __future__ import annotations

import argparse
import json

from splice.library import AdapterLibrary, LibraryEntry, LibraryError
from splice.library.manifest import PROVENANCE
from splice.tables import format_table

NAME = "library"
HELP = "an on-disk adapter library bound to one base model"
DESCRIPTION = ("Keep adapters for one base model in a folder. The first add binds the library to "
               "the fingerprint of --model's weights; an adapter trained on another base (its "
               "training.json says so) is refused unless --force. An adapter without a recorded "
               "base is attached to --model to check that it fits, or recorded as of unknown "
               "provenance when no --model is given. Writes are atomic and take a file lock, so "
               "several processes may share a library.")
EPILOG = """examples:
  splice library add --library adapters --model smollm2-135m --name demo runs/demo
  splice library list --library adapters
  splice library show --library adapters demo
  splice library rename --library adapters demo demo-v1
  splice library rm --library adapters demo-v1"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="library_command", metavar="ACTION", required=True)

    def action(name: str, help_text: str, handler) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--library", required=True, metavar="DIR", help="the library folder")
        sub.set_defaults(library_run=handler)
        return sub

    add = action("add", "copy an adapter folder into the library", run_add)
    add.add_argument("--model", help="the base model (alias or folder): binds a new library, "
                     "checks the adapter against it; its fingerprint is cached in the library")
    add.add_argument("--name", required=True, help="the entry's name (letters, digits, '_', '-')")
    add.add_argument("--notes", default="", help="free text kept with the entry")
    add.add_argument("--force", action="store_true",
                     help="add even if the adapter's base fingerprint differs from the library's")
    add.add_argument("folder", metavar="FOLDER", help="the adapter folder (adapter_config.json + "
                     "adapter_model.safetensors)")
    listing = action("list", "list the adapters with method, rank, targets, size, created, notes",
                     run_list)
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    show = action("show", "show one adapter's entry", run_show)
    show.add_argument("name")
    show.add_argument("--json", action="store_true", help="print JSON")
    action("rm", "remove an adapter", run_remove).add_argument("name")
    rename = action("rename", "rename an adapter", run_rename)
    rename.add_argument("old")
    rename.add_argument("new")


def run(args: argparse.Namespace) -> int:
    return args.library_run(args)


def run_add(args: argparse.Namespace) -> int:
    entry = AdapterLibrary(args.library).add(args.name, args.folder, model=args.model,
                                             notes=args.notes, force=args.force)
    print(f"added {entry.name!r} ({entry.method}, {human_size(entry.size_bytes)}; base: "
          f"{entry.provenance}) to {args.library}")
    if entry.provenance in ("forced", "unknown"):
        print(f"warning: {PROVENANCE[entry.provenance]}")
    return 0


def run_list(args: argparse.Namespace) -> int:
    library = AdapterLibrary(args.library)
    require_library(library)
    entries = library.list()
    if args.json:
        print(json.dumps([e.to_json() for e in entries], indent=2))
        return 0
    manifest = library.manifest
    print(f"library {args.library}: base {manifest.model} ({manifest.base_fingerprint[:16]}), "
          f"{len(entries)} adapter(s)")
    if entries:
        headers = ["name", "method", "rank", "targets", "size", "created", "notes"]
        rows = [[e.name, e.method, "-" if e.rank is None else e.rank, targets_text(e.targets),
                 human_size(e.size_bytes), e.created, e.notes] for e in entries]
        print(format_table(headers, rows, [False, False, True, False, True, False, False]))
    return 0


def run_show(args: argparse.Namespace) -> int:
    library = AdapterLibrary(args.library)
    require_library(library)
    entry = library.show(args.name)
    if args.json:
        print(json.dumps(entry.to_json(), indent=2))
        return 0
    print(describe(entry))
    return 0


def run_remove(args: argparse.Namespace) -> int:
    AdapterLibrary(args.library).remove(args.name)
    print(f"removed {args.name!r} from {args.library}")
    return 0


def run_rename(args: argparse.Namespace) -> int:
    AdapterLibrary(args.library).rename(args.old, args.new)
    print(f"renamed {args.old!r} to {args.new!r} in {args.library}")
    return 0


def require_library(library: AdapterLibrary) -> None:
    if not library.exists:
        raise LibraryError(f"no adapter library at {library.folder} (it has no library.json); "
                                "`splice library add` creates one")


def describe(entry: LibraryEntry) -> str:
    rows = [("name", entry.name), ("method", entry.method),
            ("rank", "-" if entry.rank is None else entry.rank),
            ("targets", targets_text(entry.targets)),
            ("size", f"{human_size(entry.size_bytes)} ({entry.size_bytes:,} bytes)"),
            ("created", entry.created), ("notes", entry.notes), ("source", entry.source),
            ("base", f"{entry.provenance}: {PROVENANCE.get(entry.provenance, '')}"),
            ("fingerprint", entry.base_fingerprint or "-"), ("path", entry.path)]
    return "\n".join(f"{key:12s} {value}" for key, value in rows)


def targets_text(targets: tuple[str, ...] | str | None) -> str:
    if targets is None:
        return "-"
    return targets if isinstance(targets, str) else ",".join(targets)


def human_size(size: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"
