"""AdapterLibrary on tiny random models: binding by fingerprint, refusals that name both
fingerprints, atomic adds under crashes and concurrent writers, names, list fields against the
adapter files, rename/remove, and load_into against load_adapter from the original folder."""

from __future__ import annotations

import copy
import json
import multiprocessing
import os
import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import torch

import splice
import splice.library.fingerprints as fingerprints
from splice.core.io import CONFIG_FILE
from splice.library import (AdapterLibrary, BaseMismatchError, EntryExistsError,
                            EntryNotFoundError, LibraryError, LibraryNameError)
from splice.library.lock import write_lock
from splice.models import model_fingerprint
from helpers import logits, token_ids

FORK = multiprocessing.get_context("fork")  # children only copy files: no torch threads at risk
LORA = splice.LoRAConfig(rank=4, target_modules=["q_proj", "v_proj", "down_proj"])


def save_perturbed(model, folder: Path, config=LORA, *, seed: int = 0, fingerprint: str | None = None):
    """Save a non-zero adapter of `config` on a copy of `model` to `folder` and return the copy;
    with `fingerprint`, also a training.json recording it as `splice train` does."""
    adapted = splice.attach(copy.deepcopy(model), config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    splice.save_adapter(adapted, folder)
    if fingerprint is not None:
        (folder / "training.json").write_text(json.dumps({"base_model_fingerprint": fingerprint}))
    return adapted


def other_base(model):
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.model.layers[0].self_attn.q_proj.weight.add_(0.01)
    return other


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def leftovers(library: Path) -> list[str]:
    return [p.name for p in (library / "adapters").iterdir() if p.name.startswith(".")]


@pytest.fixture
def lora_folder(tmp_path, tiny_llama) -> Path:
    save_perturbed(tiny_llama, tmp_path / "lora")
    return tmp_path / "lora"


def test_first_add_binds_the_library_and_list_matches_the_adapter_files(tmp_path, tiny_llama, lora_folder):
    ia3 = tmp_path / "ia3"
    save_perturbed(tiny_llama, ia3, splice.IA3Config(), seed=1)
    library = AdapterLibrary(tmp_path / "lib")
    before = datetime.now(timezone.utc).replace(microsecond=0)
    modules = [(name, type(module)) for name, module in tiny_llama.named_modules()]
    library.add("qv", lora_folder, model=tiny_llama, notes="first")
    library.add("scales", ia3, model=tiny_llama)
    # The fit check attached each adapter to the model and took it off again.
    assert not splice.list_adapters(tiny_llama)
    assert [(name, type(module)) for name, module in tiny_llama.named_modules()] == modules
    assert library.base_fingerprint == model_fingerprint(tiny_llama)
    entries = {e.name: e for e in library.list()}
    assert sorted(entries) == ["qv", "scales"]
    for entry, source, method in [(entries["qv"], lora_folder, "lora"), (entries["scales"], ia3, "ia3")]:
        config = json.loads((source / CONFIG_FILE).read_text())
        assert entry.method == method
        assert entry.rank == config.get("r")
        assert sorted(entry.targets) == sorted(config["target_modules"])
        assert entry.size_bytes == sum(len(b) for b in files_of(source).values())
        assert before <= datetime.fromisoformat(entry.created) <= before + timedelta(minutes=5)
        assert entry.provenance == "fits-model"
        copied = files_of(entry.path)
        assert copied.pop("library_entry.json")
        assert copied == files_of(source)  # verbatim
    assert entries["qv"].rank == 4 and entries["scales"].rank is None
    assert entries["qv"].notes == "first" and entries["scales"].notes == ""
    assert library.show("qv") == entries["qv"]


def test_adapter_trained_on_another_base_is_refused_naming_both_fingerprints(tmp_path, tiny_llama, lora_folder):
    library = AdapterLibrary(tmp_path / "lib")
    library.add("base-made", lora_folder, model=tiny_llama)
    ours, theirs = model_fingerprint(tiny_llama), model_fingerprint(other_base(tiny_llama))
    assert ours != theirs
    foreign = tmp_path / "foreign"
    save_perturbed(tiny_llama, foreign, fingerprint=theirs)
    with pytest.raises(BaseMismatchError) as err:
        library.add("foreign", foreign)
    assert ours in str(err.value) and theirs in str(err.value) and "force" in str(err.value)
    assert [e.name for e in library.list()] == ["base-made"]
    entry = library.add("foreign", foreign, force=True)
    assert entry.provenance == "forced" and entry.base_fingerprint == theirs
    assert library.base_fingerprint == ours  # forcing one entry does not rebind the library


def test_a_model_of_another_base_is_refused_naming_both_fingerprints(tmp_path, tiny_llama, lora_folder):
    library = AdapterLibrary(tmp_path / "lib")
    library.add("a", lora_folder, model=tiny_llama)
    other = other_base(tiny_llama)
    with pytest.raises(BaseMismatchError) as err:
        library.add("b", lora_folder, model=other)
    assert model_fingerprint(tiny_llama) in str(err.value) and model_fingerprint(other) in str(err.value)
    with pytest.raises(BaseMismatchError):
        library.add_from_model("c", splice.attach(other, LORA))


def test_provenance_recorded_unknown_and_a_misfit_refused(tmp_path, tiny_llama, tiny_gpt2, lora_folder):
    recorded = tmp_path / "recorded"
    save_perturbed(tiny_llama, recorded, fingerprint=model_fingerprint(tiny_llama))
    library = AdapterLibrary(tmp_path / "lib")
    with pytest.raises(LibraryError, match="pass the base model"):
        library.add("no-base", lora_folder)  # a new library and nothing to bind it to
    assert library.add("rec", recorded).provenance == "recorded"  # binds by the recorded base
    assert library.base_fingerprint == model_fingerprint(tiny_llama) and library.manifest.model is None
    assert library.add("unk", lora_folder).provenance == "unknown"
    gpt2_folder = tmp_path / "gpt2"
    save_perturbed(tiny_gpt2, gpt2_folder, splice.LoRAConfig(rank=2, target_modules=["c_attn"]))
    with pytest.raises(LibraryError, match="does not fit"):
        library.add("misfit", gpt2_folder, model=tiny_llama)
    assert "misfit" not in [e.name for e in library.list()]
    assert library.add("misfit", gpt2_folder, model=tiny_llama, force=True).provenance == "forced"
    assert not splice.list_adapters(tiny_llama)  # the fit check left the model as it was


@pytest.mark.parametrize("name", ["../evil", "a/b", "..", ".hidden", "", "a.b", "-flag", "x" * 101,
                                  "__base__", "a\\b", "a b"])
def test_names_with_path_parts_or_odd_characters_are_refused(tmp_path, tiny_llama, lora_folder, name):
    library = AdapterLibrary(tmp_path / "lib")
    with pytest.raises(LibraryNameError, match="invalid"):
        library.add(name, lora_folder, model=tiny_llama)
    assert not (tmp_path / "lib").exists() and not (tmp_path / "evil").exists()
    library.add("ok", lora_folder, model=tiny_llama)
    with pytest.raises(LibraryNameError):
        library.rename("ok", name)
    with pytest.raises(LibraryNameError):
        library.show(name)
    assert [e.name for e in library.list()] == ["ok"]


def test_rename_and_remove(tmp_path, tiny_llama, lora_folder):
    library = AdapterLibrary(tmp_path / "lib")
    first = library.add("first", lora_folder, model=tiny_llama, notes="keep me")
    library.add("second", lora_folder, model=tiny_llama)
    with pytest.raises(EntryExistsError):
        library.add("first", lora_folder, model=tiny_llama)
    with pytest.raises(EntryExistsError):
        library.rename("first", "second")
    before = files_of(first.path)
    renamed = library.rename("first", "third")
    assert [e.name for e in library.list()] == ["second", "third"]
    assert renamed.notes == "keep me" and renamed.created == first.created
    assert renamed.path.name == "third" and files_of(renamed.path) == before
    with pytest.raises(EntryNotFoundError):
        library.show("first")
    library.remove("third")
    assert [e.name for e in library.list()] == ["second"]
    assert leftovers(tmp_path / "lib") == []
    with pytest.raises(EntryNotFoundError):
        library.remove("third")
    with pytest.raises(EntryNotFoundError):
        library.rename("third", "fourth")


def test_load_into_gives_the_logits_of_load_adapter_from_the_original_folder(tmp_path, tiny_llama, lora_folder):
    adapted = save_perturbed(tiny_llama, tmp_path / "src")
    library = AdapterLibrary(tmp_path / "lib")
    library.add("demo", tmp_path / "src", model=tiny_llama)
    ids = token_ids(tiny_llama)
    direct = splice.load_adapter(copy.deepcopy(tiny_llama), tmp_path / "src")
    via_library = library.load_into(copy.deepcopy(tiny_llama), "demo")
    assert list(splice.list_adapters(via_library)) == ["demo"] and splice.active_adapters(via_library) == ["demo"]
    expected = logits(direct, ids)
    assert torch.equal(logits(via_library, ids), expected)
    assert torch.equal(logits(adapted, ids), expected)
    assert not torch.allclose(logits(tiny_llama, ids), expected)  # the adapter is not a no-op
    named = library.load_into(copy.deepcopy(tiny_llama), "demo", adapter_name="other", activate=False)
    assert list(splice.list_adapters(named)) == ["other"] and splice.active_adapters(named) == []


def test_load_into_refuses_another_base_naming_both_fingerprints(tmp_path, tiny_llama, lora_folder):
    library = AdapterLibrary(tmp_path / "lib")
    library.add("demo", lora_folder, model=tiny_llama)
    other = other_base(tiny_llama)
    with pytest.raises(BaseMismatchError) as err:
        library.load_into(other, "demo")
    assert model_fingerprint(tiny_llama) in str(err.value) and model_fingerprint(other) in str(err.value)
    assert not splice.list_adapters(other)
    assert list(splice.list_adapters(library.load_into(other, "demo", force=True))) == ["demo"]


def test_resident_fingerprint_is_hashed_once_until_a_base_weight_changes(tmp_path, tiny_llama,
                                                                        lora_folder, monkeypatch):
    library = AdapterLibrary(tmp_path / "lib")
    library.add("demo", lora_folder, model=copy.deepcopy(tiny_llama))
    calls = []
    monkeypatch.setattr(fingerprints, "model_fingerprint",
                        lambda m: calls.append(1) or model_fingerprint(m))
    for _ in range(3):
        library.load_into(tiny_llama, "demo")
        splice.delete_adapter(tiny_llama, "demo")
    assert len(calls) == 1
    with torch.no_grad():
        tiny_llama.model.layers[1].mlp.up_proj.weight.mul_(1.5)  # the base is no longer the base
    with pytest.raises(BaseMismatchError):
        library.load_into(tiny_llama, "demo")
    assert len(calls) == 2


def test_a_named_model_folder_is_fingerprinted_once_and_again_after_it_changes(tmp_path, tiny_llama,
                                                                              monkeypatch):
    base = tmp_path / "base"
    tiny_llama.save_pretrained(base)
    recorded = tmp_path / "recorded"
    save_perturbed(tiny_llama, recorded, fingerprint=model_fingerprint(tiny_llama))
    library = AdapterLibrary(tmp_path / "lib")
    library.add("one", recorded, model=str(base))
    loads = []
    real_load = fingerprints.load_model
    monkeypatch.setattr(fingerprints, "load_model", lambda name: loads.append(name) or real_load(name))
    library.add("two", recorded, model=str(base))
    assert loads == []  # cached in library.json
    other_base(tiny_llama).save_pretrained(base)  # new weights in the same folder
    with pytest.raises(BaseMismatchError):
        library.add("three", recorded, model=str(base))
    assert loads == [str(base)]


def _add_then_crash(library: Path, source: Path) -> None:
    copied = []

    def copy_one_then_die(src, dst, *args, **kwargs):
        if copied:
            os._exit(3)  # a crash: no exception handler, no cleanup runs
        copied.append(src)
        return real_copy(src, dst, *args, **kwargs)

    real_copy = shutil.copyfile
    shutil.copyfile = copy_one_then_die
    AdapterLibrary(library).add("half", source)


def test_a_crash_mid_add_leaves_no_half_entry_and_the_next_open_cleans_up(tmp_path, tiny_llama, lora_folder):
    recorded = tmp_path / "recorded"
    save_perturbed(tiny_llama, recorded, fingerprint=model_fingerprint(tiny_llama))
    AdapterLibrary(tmp_path / "lib").add("whole", recorded)
    child = FORK.Process(target=_add_then_crash, args=(tmp_path / "lib", recorded))
    child.start()
    child.join(60)
    assert child.exitcode == 3
    stale = leftovers(tmp_path / "lib")
    assert len(stale) == 1 and stale[0].startswith(".tmp-")
    assert len(list((tmp_path / "lib" / "adapters" / stale[0]).iterdir())) == 1  # died mid-copy
    library = AdapterLibrary(tmp_path / "lib")  # the next open
    assert leftovers(tmp_path / "lib") == []
    assert [e.name for e in library.list()] == ["whole"]
    with pytest.raises(EntryNotFoundError):
        library.show("half")
    assert library.add("half", recorded).provenance == "recorded"


def test_an_interrupted_add_cleans_up_at_once(tmp_path, tiny_llama, lora_folder, monkeypatch):
    library = AdapterLibrary(tmp_path / "lib")
    library.add("whole", lora_folder, model=tiny_llama)

    def interrupt(src, dst, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "copyfile", interrupt)
    with pytest.raises(KeyboardInterrupt):
        library.add("half", lora_folder, model=tiny_llama)
    assert leftovers(tmp_path / "lib") == [] and [e.name for e in library.list()] == ["whole"]


def _add_after_barrier(library: Path, name: str, source: Path, barrier, results) -> None:
    barrier.wait()
    try:
        AdapterLibrary(library).add(name, source)
        results.put((name, "ok"))
    except EntryExistsError:
        results.put((name, "exists"))


def test_concurrent_adds_from_several_processes_all_land_intact(tmp_path, tiny_llama):
    fingerprint = model_fingerprint(tiny_llama)
    sources = []
    for i in range(3):
        sources.append(tmp_path / f"src{i}")
        save_perturbed(tiny_llama, sources[-1], seed=i, fingerprint=fingerprint)
    barrier, results = FORK.Barrier(3), FORK.Queue()
    # Three writers race to bind a new library and add distinct names ...
    children = [FORK.Process(target=_add_after_barrier,
                             args=(tmp_path / "lib", f"a{i}", sources[i], barrier, results))
                for i in range(3)]
    for child in children:
        child.start()
    for child in children:
        child.join(60)
    assert [child.exitcode for child in children] == [0, 0, 0]
    assert sorted(results.get(timeout=5) for _ in range(3)) == [(f"a{i}", "ok") for i in range(3)]
    library = AdapterLibrary(tmp_path / "lib")
    assert library.base_fingerprint == fingerprint
    for i in range(3):
        copied = files_of(library.show(f"a{i}").path)
        copied.pop("library_entry.json")
        assert copied == files_of(sources[i])
    # ... then race for one name: exactly one wins, and its files are whole.
    barrier = FORK.Barrier(3)
    children = [FORK.Process(target=_add_after_barrier,
                             args=(tmp_path / "lib", "same", sources[i], barrier, results))
                for i in range(3)]
    for child in children:
        child.start()
    for child in children:
        child.join(60)
    outcomes = sorted(results.get(timeout=5)[1] for _ in range(3))
    assert outcomes == ["exists", "exists", "ok"]
    copied = files_of(library.show("same").path)
    copied.pop("library_entry.json")
    assert copied in [files_of(source) for source in sources]
    assert leftovers(tmp_path / "lib") == []


def _hold_lock(library: Path, held, release) -> None:
    with write_lock(library):
        held.set()
        release.wait(60)


def test_a_writer_waits_for_the_lock(tmp_path, tiny_llama):
    recorded = tmp_path / "recorded"
    save_perturbed(tiny_llama, recorded, fingerprint=model_fingerprint(tiny_llama))
    held, release, results = FORK.Event(), FORK.Event(), FORK.Queue()
    # The holder is a process of its own: a child forked while its parent held the lock would
    # share the parent's lock and wait on itself.
    holder = FORK.Process(target=_hold_lock, args=(tmp_path / "lib", held, release))
    holder.start()
    assert held.wait(30)
    writer = FORK.Process(target=_add_after_barrier,
                          args=(tmp_path / "lib", "waiting", recorded, FORK.Barrier(1), results))
    writer.start()
    writer.join(1.0)
    assert writer.is_alive() and not (tmp_path / "lib" / "adapters" / "waiting").exists()
    release.set()
    writer.join(60)
    holder.join(60)
    assert writer.exitcode == 0 and results.get(timeout=5) == ("waiting", "ok")


def test_add_from_model_saves_the_resident_adapter(tmp_path, tiny_llama):
    adapted = save_perturbed(tiny_llama, tmp_path / "src")
    library = AdapterLibrary(tmp_path / "lib")
    entry = library.add_from_model("saved", adapted, notes="from memory")
    assert entry.provenance == "saved" and entry.base_fingerprint == model_fingerprint(tiny_llama)
    assert entry.method == "lora" and entry.rank == 4
    ids = token_ids(tiny_llama)
    assert torch.equal(logits(library.load_into(copy.deepcopy(tiny_llama), "saved"), ids),
                       logits(adapted, ids))
    with pytest.raises(splice.AdapterError):
        library.add_from_model("missing", adapted, adapter="nope")
