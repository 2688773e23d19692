"""Write the `make demo` task: free-text person records -> one fixed key=value line.

    python scripts/make_demo_task.py                 # writes data/demo/{train,eval}.jsonl
    python scripts/make_demo_task.py --out /tmp/demo # somewhere else

Deterministic (fixed seed, standard library only): running it again rewrites the same bytes.
See data/demo/README.md for the task and why it was chosen.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SEED = 20240611
TRAIN_SIZE = 1000
EVAL_SIZE = 120

INSTRUCTION = "Rewrite as one line: name=...; age=...; job=...; city=..."

FIRST_NAMES = [
    "Maria", "James", "Aisha", "Kenji", "Olga", "Pedro", "Fatima", "Liam", "Chloe", "Ivan",
    "Sofia", "Omar", "Hannah", "Lucas", "Mei", "Tomas", "Nadia", "Ethan", "Priya", "Jonas",
    "Elena", "Samuel", "Yuki", "Rosa", "Daniel", "Leila", "Marco", "Anna", "Victor", "Grace",
    "Diego", "Ingrid", "Hassan", "Clara", "Felix", "Amara", "Pablo", "Zoe", "Nikolai", "Lena",
    "Ravi", "Julia", "Mateo", "Sara", "Oscar", "Irene", "Ahmed", "Nora", "Bruno", "Emma",
]
LAST_NAMES = [
    "Lopez", "Smith", "Khan", "Tanaka", "Petrova", "Silva", "Haddad", "Murphy", "Dubois", "Novak",
    "Rossi", "Farah", "Becker", "Moreau", "Chen", "Horvat", "Said", "Walker", "Patel", "Berg",
    "Garcia", "Okafor", "Sato", "Mendes", "Fischer", "Rahimi", "Conti", "Nowak", "Costa", "Hughes",
    "Ramos", "Larsen", "Aziz", "Keller", "Weber", "Mensah", "Ortiz", "Clarke", "Ivanov", "Lund",
    "Sharma", "Kowalski", "Navarro", "Jensen", "Brooks", "Romero", "Ali", "Lindqvist", "Vargas",
    "Baker",
]
JOBS = [
    "nurse", "teacher", "plumber", "architect", "baker", "pilot", "chemist", "lawyer", "dentist",
    "painter", "electrician", "journalist", "farmer", "librarian", "engineer", "chef", "tailor",
    "pharmacist", "carpenter", "photographer", "accountant", "firefighter", "musician", "surgeon",
    "mechanic", "translator", "florist", "geologist", "barber", "economist",
]
CITIES = [
    "Valencia", "Lyon", "Osaka", "Porto", "Leeds", "Krakow", "Nairobi", "Denver", "Hamburg",
    "Turin", "Quito", "Tampere", "Brisbane", "Seville", "Gdansk", "Accra", "Boston", "Zurich",
    "Bergen", "Lima", "Dublin", "Kyoto", "Ghent", "Malmo", "Austin", "Cork", "Bilbao", "Perth",
    "Graz", "Toronto", "Dakar", "Bologna", "Utrecht", "Oslo", "Seattle", "Cardiff", "Tbilisi",
    "Cusco", "Adelaide", "Riga",
]
# How a record is phrased: the same four facts in varied order and wording.
TEMPLATES = [
    "{name}, {age}, {job} from {city}",
    "{name} ({age}) works as a {job} in {city}",
    "{city} {job} {name}, age {age}",
    "{age}-year-old {job} {name} lives in {city}",
    "{name} is a {job} based in {city}, aged {age}",
    "{job}: {name}, {age} years old, {city}",
]


def make_example(rng: random.Random) -> dict[str, str]:
    name = f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"
    fields = {"name": name, "age": str(rng.randint(19, 78)), "job": rng.choice(JOBS),
              "city": rng.choice(CITIES)}
    record = rng.choice(TEMPLATES).format(**fields)
    record = record[0].upper() + record[1:]
    completion = "; ".join(f"{key}={value}" for key, value in fields.items())
    return {"prompt": f"{INSTRUCTION}\n{record}", "completion": completion}


def make_splits(seed: int = SEED) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Distinct examples (by prompt): the first EVAL_SIZE drawn are the eval split."""
    rng = random.Random(seed)
    seen: set[str] = set()
    examples: list[dict[str, str]] = []
    while len(examples) < EVAL_SIZE + TRAIN_SIZE:
        example = make_example(rng)
        if example["prompt"] not in seen:
            seen.add(example["prompt"])
            examples.append(example)
    return examples[EVAL_SIZE:], examples[:EVAL_SIZE]


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).resolve().parent.parent / "data" / "demo",
                        help="folder for train.jsonl and eval.jsonl (default: data/demo)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    train, evaluation = make_splits()
    write_jsonl(args.out / "train.jsonl", train)
    write_jsonl(args.out / "eval.jsonl", evaluation)
    print(f"wrote {len(train)} train and {len(evaluation)} eval examples to {args.out}")


if __name__ == "__main__":
    main()
