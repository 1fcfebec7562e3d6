"""Bad input: one clear message naming the value and what was expected, and a non-zero exit."""

import json
import socket
import subprocess
import sys

import pytest


def run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "kvsqueeze.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("args, message", [
    (["eval", "--method", "nope", "--ratio", "4"], "method='nope': expected one of"),
    (["eval", "--method", "window", "--ratio", "0.5"], "ratio=0.5: expected a number >= 1"),
    (["eval", "--method", "window", "--ratio", "4", "--text", "/no/such/file.txt"],
     "--text='/no/such/file.txt': no such file"),
    (["eval", "--method", "window", "--ratio", "4", "--prefix-tokens", "9000"],
     "expected at most the model's context of 8192 tokens"),
    (["eval", "--method", "window", "--ratio", "40"], "ratio=40.0: expected at most"),
    (["serve", "--engine", "vllm"], "engine='vllm': expected one of sglang"),
    (["serve", "--method", "nope"], "method='nope': expected one of"),
    (["eval", "--method", "window"], "needs a ratio: --ratio 4 (or 2,4,8), or window:4"),
    (["eval", "--method", "dms", "--ratio", "3"], "ratio=3.0: expected a ratio the shipped DMS gates have (4, 8)"),
    (["eval", "--method", "dms:3"], "ratio=3.0: expected a ratio the shipped DMS gates have (4, 8)"),
    (["eval", "--method", "window:x"], "method='window:x': expected window:RATIO with RATIO a number"),
    (["eval", "--method", "int4:4"], "method='int4:4': expected int4 without a setting"),
    (["eval", "--method", "kvtc:8:fast"], "method='kvtc:8:fast': expected kvtc without a variant"),
    (["eval", "--method", "fusion:0.9:cos"], "method='fusion:0.9:cos': expected a variant of fusion"),
    (["eval", "--method", "kvtc::8"], "without empty parts"),
    (["eval", "--method", "window", "--ratio", "4", "--checkpoint", "/tmp"],
     "checkpoint='/tmp': expected to be used with --method dms"),
    (["eval", "--method", "window", "--ratio", "4", "--dms-scored", "evict"],
     "dms-scored='evict': expected to be used with --method dms"),
    (["eval", "--method", "window", "--ratio", "4", "--calibration", "/tmp/x"],
     "calibration='/tmp/x': expected to be used with --method kvtc"),
    (["eval", "--method", "kvtc", "--ratio", "8", "--calibration", "/no/such.safetensors"],
     "calibration='/no/such.safetensors': expected a file written by `kvsqueeze kvtc calibrate`"),
    (["kvtc", "calibrate", "--out", "/tmp", "--segments", "1"], "out='/tmp': expected a file path"),
    (["eval", "--method", "fusion", "--threshold", "1.5"], "threshold=1.5: expected a cosine similarity in (0, 1]"),
    (["eval", "--method", "fusion", "--threshold", "abc"], "threshold='abc': expected a cosine similarity"),
    (["eval", "--method", "fusion:0.8", "--threshold", "0.9"], "method='fusion:0.8': expected fusion without a setting"),
    (["eval", "--method", "window", "--ratio", "2", "--threshold", "0.8"],
     "threshold='0.8': expected to be used with --method fusion"),
    (["eval", "--method", "fusion", "--block-size", "0"], "block_size=0: expected a number of tokens"),
    (["eval", "--method", "fusion", "--online"], "online=True: expected to be used with --workload"),
    (["eval", "--method", "fusion", "--scope", "chunks", "--chunk-tokens", "24"],
     "chunk_tokens=24: expected a multiple of the block size (16)"),
    (["eval", "--method", "fusion", "--grouping", "split"],
     "grouping='split': expected batch with scope chunks"),
    (["eval", "--method", "window", "--ratio", "2", "--scope", "any"],
     "scope='any': expected to be used with --method fusion"),
    (["eval", "--method", "fusion", "--scope", "chunks", "--window-chunks", "0"], "window_chunks=0"),
    (["eval", "--method", "fusion", "--prefix-tokens", "512"],
     "prefix_tokens=512: expected at least one window of 8 chunks x 128 tokens (1024)"),
    (["eval", "--method", "snapkv:4:wide"], "expected a variant of snapkv: one of default, paper"),
    (["dms", "offset", "--method", "window", "--text", "x", "--out", "/tmp/kvsq-never"],
     "method='window': expected dms:RATIO (shipped gates) or dms:DIR"),
    (["dms", "offset", "--text", "/no/such.txt", "--out", "/tmp/kvsq-never"], "--text='/no/such.txt': no such file"),
    (["dms", "offset", "--target", "0.5", "--text", "x", "--out", "/tmp/kvsq-never"], "target=0.5"),
    (["serve", "--method", "window"], "method='window': expected a method that runs in SGLang"),
    (["serve", "--method", "dms:3"], "ratio=3.0: expected a ratio the shipped DMS gates have (4, 8)"),
    (["serve", "--method", "dms:/tmp"], "dms_config.json is missing"),
    (["serve", "--method", "dms:4", "--", "--attention-backend", "torch_native"],
     "attention-backend='torch_native': expected dms"),
    (["serve", "--method", "dms:4", "--", "--radix-cache-backend", "flexkv"],
     "radix-cache-backend='flexkv': expected kvsqueeze-dms with DMS"),
    (["serve", "--method", "dms:4", "--", "--enable-mixed-chunk"], "enable-mixed-chunk='given': expected not given"),
    (["serve", "--method", "dms:4", "--", "--page-size", "16"], "page-size='16': expected 1 with DMS"),
    (["serve", "--method", "dms:4+kvtc:8"], "dms and kvtc cannot run in one server"),
    (["serve", "--method", "fusion+dms"], "dms and fusion cannot run in one server"),
    (["serve", "--method", "none+kvtc"], "expected none alone"),
    (["serve", "--method", "kvtc:8+kvtc:4"], "expected each method once per server"),
    (["dms", "train", "--target-ratio", "4", "--out", "/tmp/kvsq-never", "--device", "tpu"],
     "device='tpu': expected cpu, or cuda[:N] on a machine with a CUDA GPU"),
    (["serve", "--method", "fusion", "--ratio", "4"], "ratio='given': expected the method's spelling instead: --method dms:4"),
    (["serve", "--method", "fusion:1.5"], "threshold=1.5: expected a cosine similarity in (0, 1]"),
    (["serve", "--method", "fusion:0.9", "--", "--page-size", "1"], "page-size='1': expected a page size above 1"),
    (["serve", "--method", "fusion", "--", "--disable-radix-cache"],
     "disable-radix-cache='given': expected not given with fusion"),
    (["serve", "--method", "kvtc:0.5"], "kvtc:RATIO with RATIO a number >= 1"),
    (["serve", "--method", "kvtc:8", "--", "--page-size", "8"], "page-size='8': expected at least 16 tokens"),
    (["serve", "--method", "kvtc:8", "--", "--enable-hierarchical-cache"],
     "enable-hierarchical-cache='given': expected not given with kvtc"),
    (["serve", "--kv-store", "kvtc"], "kv-store='given': expected the method's spelling instead: --method kvtc:8"),
    (["serve", "--threshold", "0.9"], "threshold='given': expected the method's spelling instead: --method fusion:0.9"),
    (["serve", "--store-dir", "/tmp/x"], "store-dir='/tmp/x': expected to be used with --method kvtc"),
    (["eval", "--method", "fusion", "--workload", "tweets"], "workload='tweets': expected one of edits"),
    (["eval", "--method", "fusion,window", "--ratio", "2", "--workload", "edits"],
     "workload='edits': expected to be used with --method fusion alone"),
    (["eval", "--method", "fusion", "--workload", "edits", "--requests", "1"], "requests=1"),
])
def test_bad_input(args, message, capsys):
    """In this process (the command's own entry point, as the console script calls it): one line on
    stderr naming the value, exit code 2, no traceback. test_bad_input_from_the_shell runs a few
    through a real process."""
    from kvsqueeze.cli import main

    assert main(list(args)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err


def test_bad_input_from_the_shell():
    for args, message in ((["eval", "--method", "nope", "--ratio", "4"], "method='nope': expected one of"),
                          (["serve", "--method", "dms:4+kvtc:8"], "dms and kvtc cannot run in one server")):
        r = run(*args)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_prefix_longer_than_text(tmp_path):
    f = tmp_path / "short.txt"
    f.write_text("Only a few words here.")
    r = run("eval", "--method", "window", "--ratio", "4", "--text", str(f))
    assert r.returncode == 2
    assert "1281 tokens are needed per segment, but the longest --text file has" in r.stderr


def test_unreadable_text_file(tmp_path):
    f = tmp_path / "binary.txt"
    f.write_bytes(b"\xff\xfe\x00\x81" * 10)
    r = run("eval", "--method", "window", "--ratio", "4", "--text", str(f))
    assert r.returncode == 2 and "cannot be read" in r.stderr


def test_port_in_use():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = run("serve", "--port", str(port))
    assert r.returncode == 2
    assert f"--port={port}: already in use" in r.stderr


def test_methods_lists_registry():
    r = run("methods")
    assert r.returncode == 0
    for name in ("dense", "window", "snapkv", "int8", "int4", "int2"):
        assert name in r.stdout


def test_eval_writes_json_records(tmp_path):
    out = tmp_path / "r" / "eval.json"
    r = run("eval", "--method", "dense,window", "--ratio", "4", "--prefix-tokens", "128",
            "--scored-tokens", "16", "--segments", "2", "--recent", "16", "--json", str(out))
    assert r.returncode == 0, r.stderr
    import json

    recs = json.loads(out.read_text())
    assert [x["method"] for x in recs] == ["dense", "window"]
    need = {"method", "ratio_target", "ratio_achieved", "kl_mean", "kl_se", "top1", "ppl_delta_pct",
            "segments", "prefix_tokens", "scored_tokens", "model"}
    assert need <= set(recs[0])
    assert recs[0]["kl_mean"] == 0.0 and recs[1]["kl_mean"] > 0.0
    assert "KL mean" in r.stdout


def test_eval_dms_scored_protocols(tmp_path):
    """--dms-scored picks the protocol; both run on the shipped gates, at the same prefix ratio, and the
    records say which one ran. (Both DMS methods share one model in one run: a regression check of
    gate sets feeding each other's runs.)"""
    from kvsqueeze.cli import main  # in this process: two model loads fewer than two subprocesses

    ratios = {}
    for scored in ("keep", "evict"):
        out = tmp_path / f"{scored}.json"
        assert main(["eval", "--method", "dms", "--ratio", "4,8", "--prefix-tokens", "256",
                     "--scored-tokens", "64", "--segments", "1", "--dms-scored", scored,
                     "--json", str(out)]) == 0
        recs = json.loads(out.read_text())
        assert [x["method"] for x in recs] == ["dms", "dms"]
        assert all(x["details"]["evict_scored"] == float(scored == "evict") for x in recs)
        ratios[scored] = [x["ratio_achieved"] for x in recs]
    assert ratios["keep"] == ratios["evict"]
    assert ratios["keep"][1] > ratios["keep"][0] * 1.3  # the 8x gates really ran as the second method


def test_eval_passkey_prints_its_table_and_writes_records(tmp_path):
    """The passkey task end to end (it once computed every trial and then failed printing)."""
    out = tmp_path / "passkey.json"
    r = run("eval", "--task", "passkey", "--method", "dense,window", "--ratio", "4", "--trials", "2",
            "--context-tokens", "512", "--json", str(out))
    assert r.returncode == 0, r.stderr
    recs = json.loads(out.read_text())
    assert [x["method"] for x in recs] == ["dense", "window"]
    assert all(x["trials"] == 2 and len(x["hits"]) == 2 for x in recs)
    lines = [ln.split() for ln in r.stdout.splitlines() if ln.startswith(("dense", "window"))]
    assert [ln[0] for ln in lines] == ["dense", "window"]
    assert [float(ln[3]) for ln in lines] == [x["accuracy"] for x in recs]


def test_dms_window_larger_than_prefix(tmp_path):
    (tmp_path / "dms_config.json").write_text(json.dumps({"window": 64, "target_ratio": 4}))
    r = run("eval", "--method", "dms", "--checkpoint", str(tmp_path), "--prefix-tokens", "32",
            "--scored-tokens", "8")
    assert r.returncode == 2
    assert "prefix_tokens=32: expected more tokens than the DMS window of 64" in r.stderr


def test_dms_checkpoint_missing_parameters(tmp_path):
    r = run("eval", "--method", "dms", "--checkpoint", str(tmp_path))
    assert r.returncode == 2 and "dms_config.json is missing" in r.stderr
