"""medmax convert-checkpoint: original Chameleon layout -> HF, checked against the original model's forward.

"Loaded by the original model code" is shown with `original_forward` below: a re-implementation
of facebookresearch/chameleon inference/transformer.py written for these tests (complex-number
rotary, fused wqkv as the original module holds it), independent of the package's
reference_logits, run on consolidated.pth itself and compared with HF's full forward pass on
the converted folder. Every test draws its own random weights (unseen by the conversion code).
"""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from medmax_pipeline.core.text_tokenizer import MODIFIED_TOKENIZER_FILE, build_chameleon_tokenizer, vocabulary_map
from medmax_pipeline.models import chameleon as H
from medmax_pipeline.models import chameleon_original as O
from medmax_pipeline.demo_models import make_random_vqgan
from medmax_pipeline.models.vqgan import save_original_checkpoint
from medmax_pipeline.stages.convert_checkpoint import ConversionError, convert_checkpoint
from medmax_pipeline.stages.export import original_state_from_hf
from test_train import child_env

REPO = Path(__file__).resolve().parent.parent
PROMPT = [0, 8197, 4, 57, 8195, 8196, 8710, 8805, 8900, 2]


# ----------------------------------------------------------------------------------------------
# The original forward pass, written for the tests
# ----------------------------------------------------------------------------------------------


def original_forward(state: dict[str, torch.Tensor], args: dict, ids: list[int]) -> torch.Tensor:
    """Logits of chameleon/inference/transformer.py's Transformer for one sequence, fp32."""
    dim, n_heads = args["dim"], args["n_heads"]
    n_kv = args.get("n_kv_heads") or n_heads
    hd, eps, theta = dim // n_heads, args.get("norm_eps", 1e-5), args.get("rope_theta", 10000.0)
    sd = {k: v.float() for k, v in state.items() if isinstance(v, torch.Tensor)}

    def rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # xformers RMSNorm
        return w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps))

    def rope(x: torch.Tensor) -> torch.Tensor:  # (T, heads, hd), pairs (2j, 2j+1) as complex numbers
        t = torch.arange(x.shape[0], dtype=torch.float64)
        freqs = theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
        rot = torch.polar(torch.ones(x.shape[0], hd // 2, dtype=torch.float64), torch.outer(t, freqs))
        xc = torch.view_as_complex(x.double().reshape(*x.shape[:-1], hd // 2, 2))
        return torch.view_as_real(xc * rot[:, None, :]).reshape(x.shape).float()

    x = sd["tok_embeddings.weight"][torch.tensor(ids)]
    T = len(ids)
    for i in range(args["n_layers"]):
        L = f"layers.{i}."
        wqkv = torch.cat([sd[L + "attention.wq.weight"], sd[L + "attention.wk.weight"], sd[L + "attention.wv.weight"]])
        w13 = torch.cat([sd[L + "feed_forward.w1.weight"], sd[L + "feed_forward.w3.weight"]])

        def attn(h: torch.Tensor) -> torch.Tensor:
            qkv = h @ wqkv.t()
            q, kv = qkv[:, : n_heads * hd], qkv[:, n_heads * hd :]
            k, v = kv.chunk(2, 1)
            q = F.layer_norm(q.view(T, n_heads, hd), (hd,), sd[L + "attention.q_normalization.weight"], sd[L + "attention.q_normalization.bias"])
            k = F.layer_norm(k.reshape(T, n_kv, hd), (hd,), sd[L + "attention.k_normalization.weight"], sd[L + "attention.k_normalization.bias"])
            q, k, v = rope(q), rope(k), v.reshape(T, n_kv, hd)
            group = n_heads // n_kv
            out = torch.empty(T, n_heads, hd)
            for head in range(n_heads):
                s = (q[:, head] @ k[:, head // group].t()) / math.sqrt(hd)
                s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
                out[:, head] = s.softmax(-1) @ v[:, head // group]
            return out.reshape(T, -1) @ sd[L + "attention.wo.weight"].t()

        def ffn(h: torch.Tensor) -> torch.Tensor:
            x1, x3 = (h @ w13.t()).chunk(2, -1)
            return (F.silu(x1) * x3) @ sd[L + "feed_forward.w2.weight"].t()

        if args.get("swin_norm"):
            h = x + rms(attn(x), sd[L + "attention_norm.weight"])
            x = h + rms(ffn(h), sd[L + "ffn_norm.weight"])
        else:
            h = x + attn(rms(x, sd[L + "attention_norm.weight"]))
            x = h + ffn(rms(h, sd[L + "ffn_norm.weight"]))
    return rms(x, sd["norm.weight"]) @ sd["output.weight"].t()


# ----------------------------------------------------------------------------------------------
# Fixtures: a tokenizer + VQGAN shared by every checkpoint, and checkpoints with fresh weights
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tokenizer") / "tokenizer"
    rng = random.Random(5)
    words = ["lung", "heart", "opacity", "effusion", "normal", "chest", "x-ray", "shows", "the", "no", "yes"]
    corpus = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(200)]
    build_chameleon_tokenizer(out, corpus, text_vocab_size=200)
    vqgan, document = make_random_vqgan(ch=32, seed=2)
    save_original_checkpoint(out, vqgan, document)
    return out


def make_checkpoint(root: Path, tokenizer_dir: Path, seed: int, **fields) -> tuple[Path, dict[str, torch.Tensor], O.OriginalParams]:
    import shutil

    vocab_size = max(vocabulary_map(tokenizer_dir / MODIFIED_TOKENIZER_FILE).values()) + 1
    p = O.OriginalParams(**{"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 4, "vocab_size": vocab_size, **fields})
    state = O.random_original_state(p, seed=seed, std=0.2)
    O.write_original_model(root / "models" / "7b", state, p)
    shutil.copytree(tokenizer_dir, root / "tokenizer")
    return root, state, p


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path):
    root = tmp_path_factory.mktemp("ckpt")
    checkpoint, state, p = make_checkpoint(root / "ckpt", tokenizer_dir, seed=11)
    record = convert_checkpoint(checkpoint, root / "hf")
    return checkpoint, state, p, root / "hf", record


def hf_logits(folder: Path, ids: list[int]) -> torch.Tensor:
    model = H.load_base_model(folder)
    H.allow_image_logits(model)
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    scale = float(expected.abs().max())
    assert scale > 1.0  # the logits are not trivially small
    assert float((actual - expected).abs().max()) <= 1e-4 * scale + 1e-5


# ----------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [{}, {"n_kv_heads": 2, "swin_norm": True, "rope_theta": 500000.0, "multiple_of": 64, "norm_eps": 1e-6}],
    ids=["7b-layout", "gqa-swin-theta"],
)
def test_hf_model_computes_what_the_original_code_computes(tmp_path: Path, tokenizer_dir: Path, fields: dict) -> None:
    checkpoint, state, p = make_checkpoint(tmp_path / "ckpt", tokenizer_dir, seed=101 + len(fields), **fields)
    convert_checkpoint(checkpoint, tmp_path / "hf")
    params_json = json.loads((checkpoint / "models/7b/params.json").read_text())
    args = {**params_json, **params_json["model"]}
    loaded = torch.load(checkpoint / "models/7b/consolidated.pth", weights_only=True)
    expected = original_forward(loaded, args, PROMPT)
    assert_close(hf_logits(tmp_path / "hf", PROMPT), expected)
    # The package's own reference forward (used by the conversion check) agrees with the tests' one.
    assert_close(O.reference_logits(lambda name: loaded[name], p, PROMPT), expected)


def test_converted_folder_is_complete_and_the_vq_model_is_the_checkpoints(converted) -> None:
    checkpoint, _, p, hf, record = converted
    config = json.loads((hf / "config.json").read_text())
    assert config["vocabulary_map"] == vocabulary_map(checkpoint / "tokenizer" / MODIFIED_TOKENIZER_FILE)
    assert (config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]) == (64, 256, 2)
    assert config["rope_parameters"]["rope_theta"] == 10000.0 and config["max_position_embeddings"] == 4096
    assert (config["bos_token_id"], config["pad_token_id"], config["eos_token_id"]) == (0, 1, 2)
    assert (hf / "tokenizer.json").read_bytes() == (checkpoint / "tokenizer" / MODIFIED_TOKENIZER_FILE).read_bytes()
    from medmax_pipeline.models.vqgan import load_hf_vqgan, load_original_vqgan

    hf_vq, original_vq = load_hf_vqgan(hf).state_dict(), load_original_vqgan(checkpoint).state_dict()
    assert hf_vq.keys() and all(torch.equal(hf_vq[k], original_vq[k]) for k in hf_vq)
    assert record["logits_check"]["max_abs_diff"] < 1e-4
    assert json.loads((hf / "medmax_conversion.json").read_text())["tensors"] == record["tensors"]


def test_both_ways_gives_back_every_original_tensor_bit_for_bit(converted) -> None:
    _, state, p, hf, _ = converted
    model = H.load_base_model(hf)
    back = original_state_from_hf(model.state_dict(), p, source="test")
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state if k != O.ROPE_FREQS_KEY)


def test_permutations_and_qk_norm_layout_are_inverse(tmp_path: Path) -> None:
    w = torch.randn(4 * 16, 64)
    assert torch.equal(O.permute_for_original(O.permute_for_hf(w, 4), 4), w)
    assert not torch.equal(O.permute_for_hf(w, 4), w)
    v = torch.randn(16)
    per_head = O.qk_norm_for_hf(v, 4)
    assert per_head.shape == (4, 16) and torch.equal(O.qk_norm_for_original(per_head, "q_norm"), v)
    per_head[2, 3] += 1.0
    with pytest.raises(O.OriginalFormatError, match="head 2 differs from head 0"):
        O.qk_norm_for_original(per_head, "model.layers.0.self_attn.q_norm.weight")


def test_params_of_the_7b_round_trip_through_the_hf_config() -> None:
    from transformers import ChameleonConfig

    assert O.ffn_hidden_dim(4096, 256, None) == 11008
    p = O.params_from_hf_config(ChameleonConfig().to_dict())  # HF's defaults are Chameleon-7B's
    assert (p.dim, p.n_layers, p.n_heads, p.ffn_dim, p.multiple_of, p.ffn_dim_multiplier) == (4096, 32, 32, 11008, 256, None)
    for dim, width in ((64, 128), (64, 256), (96, 100)):
        multiple_of, multiplier = O.ffn_params_for(dim, width)
        assert O.ffn_hidden_dim(dim, multiple_of, multiplier) == width
    params_json, consolidate = O.params_documents(p)
    assert O.params_from_dict(O.merged_params(params_json, consolidate), "x") == p


def _corrupt(tmp_path: Path, tokenizer_dir: Path, change) -> Path:
    checkpoint, state, p = make_checkpoint(tmp_path / "ckpt", tokenizer_dir, seed=7)
    change(state, checkpoint)
    torch.save(state, checkpoint / "models/7b/consolidated.pth")
    return checkpoint


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s, c: s.update({"layers.0.attention.extra.weight": torch.zeros(3)}), r"1 tensor\(s\) the conversion does not use.*extra"),
        (lambda s, c: s.pop("layers.1.feed_forward.w3.weight"), r"layers.1.feed_forward.w3.weight is missing"),
        (lambda s, c: s.update({"norm.weight": torch.ones(65)}), r"norm.weight has shape \(65,\), params.json implies \(64,\)"),
        (lambda s, c: s.update({"rope.freqs": s["rope.freqs"] * 2}), r"rope.freqs does not match params.json"),
        (lambda s, c: (c / "models/7b/params.json").write_text(json.dumps({"model": {"dim": 64, "n_layers": 2, "n_heads": 4, "vocab_size": 9}})),
         r"qk_normalization is not set"),
    ],
    ids=["unused-tensor", "missing-tensor", "wrong-shape", "rope-freqs", "no-qk-norm"],
)
def test_conversion_refuses_what_it_cannot_convert_faithfully(tmp_path: Path, tokenizer_dir: Path, change, message: str) -> None:
    checkpoint = _corrupt(tmp_path, tokenizer_dir, change)
    with pytest.raises((ConversionError, O.OriginalFormatError), match=message):
        convert_checkpoint(checkpoint, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()  # nothing half-made at the output path


def test_logits_check_catches_a_wrong_layout(tmp_path: Path, tokenizer_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Writing wq/wk without the rotary permutation gives an HF model that computes something else."""
    checkpoint, _, _ = make_checkpoint(tmp_path / "ckpt", tokenizer_dir, seed=8)
    monkeypatch.setattr(O, "permute_for_hf", lambda weight, n_heads: weight)
    with pytest.raises(O.OriginalFormatError, match="logits differ by up to"):
        convert_checkpoint(checkpoint, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_conversion_never_overwrites_a_folder_it_did_not_make(converted, tmp_path: Path) -> None:
    checkpoint, _, _, _, _ = converted
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="was not written by medmax convert-checkpoint"):
        convert_checkpoint(checkpoint, theirs)
    assert [p.name for p in theirs.iterdir()] == ["notes.txt"]
    # Its own earlier output is replaced.
    convert_checkpoint(checkpoint, tmp_path / "ours")
    convert_checkpoint(checkpoint, tmp_path / "ours")
    assert (tmp_path / "ours" / "medmax_conversion.json").is_file()


def test_conversion_reports_progress_while_it_writes(tmp_path: Path, tokenizer_dir: Path) -> None:
    import io
    import re

    checkpoint, _, _ = make_checkpoint(tmp_path / "ckpt", tokenizer_dir, seed=13)
    stream = io.StringIO()
    record = convert_checkpoint(checkpoint, tmp_path / "hf", progress_stream=stream, progress_interval_s=0.0)
    lines = stream.getvalue().splitlines()
    assert lines[0] == f"convert-checkpoint: reading {checkpoint / 'models/7b/consolidated.pth'}"
    assert re.fullmatch(rf"convert-checkpoint: writing {record['tensors']} tensors \(\d+\.\d\d GB\) to .*hf", lines[1])
    # One line per tensor at interval 0, the same format as generate's rows.
    counted = [line for line in lines if re.fullmatch(r"convert-checkpoint: tensors \d+/\d+ \(.*%\), .* MB/s, ETA .*", line)]
    assert len(counted) == record["tensors"]
    assert counted[-1].startswith(f"convert-checkpoint: tensors {record['tensors']}/{record['tensors']} (100.0%)")
    assert lines[-1].startswith("convert-checkpoint: checking the written model's logits")


def test_cli_reports_a_bad_checkpoint_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "ckpt" / "models" / "7b").mkdir(parents=True)
    (tmp_path / "ckpt" / "models" / "7b" / "consolidated.00.pth").write_bytes(b"")
    command = [sys.executable, "-m", "medmax_pipeline", "convert-checkpoint", "--checkpoint", str(tmp_path / "ckpt"), "--output", str(tmp_path / "hf")]
    done = subprocess.run(command, env=child_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'ckpt/models/7b/consolidated.pth'} does not exist (found consolidated.00.pth: sharded checkpoints "
        "are not supported); expected the original layout <ckpt>/models/7b/consolidated.pth"
    ]


def test_convert_bench_smoke(tmp_path: Path) -> None:
    """The benchmark runs end to end in seconds on its tiny preset and prints the memory figure."""
    out = tmp_path / "bench.json"
    command = [sys.executable, str(REPO / "benchmarks" / "convert_bench.py"), "--preset", "tiny", "--workdir", str(tmp_path), "--json", str(out)]
    done = subprocess.run(command, env=child_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["weight_bytes"] > 0 and figures["peak_rss_bytes"] > figures["rss_before_bytes"] > 0
    assert "peak RSS / weight bytes" in done.stdout
