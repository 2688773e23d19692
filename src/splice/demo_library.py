"""The adapter-library demo: `make demo-library` / `splice demo --library`.

One frozen SmolLM2 in memory, three small adapters trained for three behaviours on the same input
(a person record: to a key=value line, to a JSON object, shouted in capitals), put in an adapter
library, then one mixed batch in which every row answers the same prompt with its own adapter:
the base, each adapter, and a composition of two. Each row is checked against the same row run
alone.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable

from splice.config.train import TrainConfig
from splice.core.attach import BASE_ADAPTER, set_active_adapters
from splice.core.routing import adapter_routing
from splice.demo import clear_previous_run, load_demo_config, say, shorten
from splice.library import AdapterLibrary
from splice.merge.compose_model import compose_adapters
from splice.models import load_model
from splice.tables import format_table
from splice.train.data import read_prompt_completions
from splice.train.evaluate import greedy_completions
from splice.train.run import run_training

DEFAULT_OUTPUT = Path("runs/demo-library")
SOURCE_TRAIN = Path("data/demo/train.jsonl")
SOURCE_EVAL = Path("data/demo/eval.jsonl")
FIELDS = ("name", "age", "job", "city")
Fields = dict[str, str]


def as_key_value(f: Fields) -> str:
    return "; ".join(f"{key}={f[key]}" for key in FIELDS)


def as_json(f: Fields) -> str:
    return json.dumps({"name": f["name"], "age": int(f["age"]), "job": f["job"], "city": f["city"]})


def as_shout(f: Fields) -> str:
    return f"{f['name']}, {f['age']}, {f['job']} from {f['city']}".upper()


BEHAVIOURS: dict[str, Callable[[Fields], str]] = {
    "keyvalue": as_key_value, "json": as_json, "shout": as_shout}
DESCRIPTIONS = {"keyvalue": "one key=value line", "json": "a JSON object",
                "shout": "the record in capitals"}
COMPOSED = "keyvalue_plus_shout"


@dataclasses.dataclass
class RowAnswer:
    adapter: str
    answer: str
    alone: str

    @property
    def same_as_alone(self) -> bool:
        return self.answer == self.alone


@dataclasses.dataclass
class LibraryDemoReport:
    exact_match: dict[str, float]
    prompt: str
    rows: list[RowAnswer]
    library: Path
    load_ms: dict[str, float]
    train_seconds: float


def parse_fields(completion: str) -> Fields:
    """`name=Ana Lee; age=30; job=baker; city=Oslo` -> {'name': 'Ana Lee', ...}"""
    pairs = (part.split("=", 1) for part in completion.split("; "))
    return {key.strip(): value.strip() for key, value in pairs}


def write_behaviour_data(behaviour: str, folder: Path, eval_rows: int,
                         train_rows: int | None = None) -> tuple[Path, Path]:
    """The bundled task's records as bare prompts, each answered in the behaviour's format."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for source, name, limit in ((SOURCE_TRAIN, "train", train_rows), (SOURCE_EVAL, "eval", eval_rows)):
        prompts, completions = read_prompt_completions(source)
        lines = [json.dumps({"prompt": record_of(p), "completion": BEHAVIOURS[behaviour](parse_fields(c))})
                 for p, c in list(zip(prompts, completions))[:limit]]
        path = folder / f"{behaviour}-{name}.jsonl"
        path.write_text("\n".join(lines) + "\n")
        paths.append(path)
    return paths[0], paths[1]


def record_of(prompt: str) -> str:
    return prompt.splitlines()[-1]


def behaviour_config(preset: Path, overrides: dict[str, Any], behaviour: str, out: Path,
                     data: tuple[Path, Path]) -> TrainConfig:
    settings = {"adapter.rank": 8, "train.steps": 20, "train.save_every": 20, "train.log_every": 5}
    settings.update(overrides)
    settings.update({"data.path": str(data[0]), "data.eval_path": str(data[1]),
                     "output": str(out / "adapters" / behaviour)})
    return load_demo_config(preset, settings)


def run_library_demo(preset: Path, overrides: dict[str, Any] | None = None,
                     output: Path = DEFAULT_OUTPUT, eval_rows: int = 24,
                     train_rows: int | None = None) -> LibraryDemoReport:
    started = time.perf_counter()
    exact: dict[str, float] = {}
    folders: dict[str, Path] = {}
    for step, behaviour in enumerate(BEHAVIOURS, start=1):
        data = write_behaviour_data(behaviour, output / "data", eval_rows, train_rows)
        config = behaviour_config(preset, overrides or {}, behaviour, output, data)
        say(f"== {step}/5 training adapter {behaviour!r} (rank {config.adapter.rank}, "
            f"{config.train.steps} steps): record -> {DESCRIPTIONS[behaviour]}")
        clear_previous_run(Path(config.output))
        result = run_training(config, show_progress=True)
        exact[behaviour] = result.exact_match or 0.0
        folders[behaviour] = result.output
        say(f"{behaviour}: held-out exact match {100 * exact[behaviour]:.1f}%")
    train_seconds = time.perf_counter() - started

    say("\n== 4/5 one library, one resident base")
    model, tokenizer = load_model(load_demo_config(preset, overrides or {}).model)
    library = AdapterLibrary(output / "library")
    for name, folder in folders.items():
        if any(entry.name == name for entry in library.list()):
            library.remove(name)
        library.add(name, folder, model=model, notes=f"demo-library: record -> {name}")
    load_ms = {}
    for entry in library.list():
        tic = time.perf_counter()
        library.load_into(model, entry.name, activate=False)
        load_ms[entry.name] = 1000 * (time.perf_counter() - tic)
        say(f"loaded {entry.name:<9} rank {entry.rank}, {entry.size_bytes / 1e6:.1f} MB "
            f"in {load_ms[entry.name]:.0f} ms")
    composition = compose_adapters(model, ["keyvalue", "shout"], [1.0, 1.0], "cat", new_name=COMPOSED)
    say(f"composed {COMPOSED!r} = keyvalue + shout (cat: the exact sum, rank "
        f"{max(m.rank for m in composition.modules)})")
    set_active_adapters(model, [])

    say("\n== 5/5 one prompt, one mixed batch: each row on its own adapter")
    prompt = record_of(read_prompt_completions(SOURCE_EVAL)[0][-1])
    rows = mixed_batch_answers(model, tokenizer, prompt, [BASE_ADAPTER, *BEHAVIOURS, COMPOSED])
    report = LibraryDemoReport(exact, prompt, rows, output / "library", load_ms, train_seconds)
    say(summary(report))
    return report


def mixed_batch_answers(model, tokenizer, prompt: str, names: list[str],
                        max_new_tokens: int = 48) -> list[RowAnswer]:
    """Greedy answers of one batch whose row i runs adapter names[i], and of each row alone."""
    # Identical prompts keep greedy_completions' length sort from reordering the rows.
    with adapter_routing(model, names):
        together = greedy_completions(model, tokenizer, [prompt] * len(names),
                                      max_new_tokens=max_new_tokens, batch_size=len(names),
                                      progress=False)
    alone = []
    for name in names:
        with adapter_routing(model, [name]):
            alone += greedy_completions(model, tokenizer, [prompt], max_new_tokens=max_new_tokens,
                                        progress=False)
    return [RowAnswer(n, a, b) for n, a, b in zip(names, together, alone)]


def summary(r: LibraryDemoReport) -> str:
    answers = format_table(
        ["row adapter", "answer (one mixed batch)", "= alone"],
        [[row.adapter, shorten(row.answer, 78), "yes" if row.same_as_alone else "NO"] for row in r.rows])
    scores = ", ".join(f"{name} {100 * em:.1f}%" for name, em in r.exact_match.items())
    loads = ", ".join(f"{name} {ms:.0f} ms" for name, ms in r.load_ms.items())
    return (f"prompt: {r.prompt}\n\n{answers}\n\n"
            f"held-out exact match per adapter: {scores}\n"
            f"library: {r.library}; load into the resident base: {loads}\n"
            f"training the three adapters: {r.train_seconds:.0f} s")
