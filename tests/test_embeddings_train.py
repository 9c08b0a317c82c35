"""``ldmkit train embedding``: only the new word's vectors learn (the model stays bit-identical), the file it
writes is an embedding ldmkit and diffusers read, its word in a prompt is what training saw, and a resumed run
equals an uninterrupted one step for step. Tiny model, 16-px images, a few steps."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from shapes import write_shapes
from train_runs import assert_same_losses, stop_and_resume

from ldmkit import cli
from ldmkit.checkpoint import load, read_safetensors, save_single_file
from ldmkit.config import TINY
from ldmkit.embeddings import EmbeddingTable, load_embedding
from ldmkit.model import StableDiffusion
from ldmkit.prompt import tokenize_chunks
from ldmkit.train import defaults, train
from ldmkit.train.runner import read_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")
SIZE = 16


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_shapes(tmp_path_factory.mktemp("data"), 6, SIZE)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("models") / "tiny.safetensors"
    save_single_file(StableDiffusion(TINY), path)
    return path


def _argv(data, model_file, out, *extra):
    return ["train", "embedding", "--model", str(model_file), "--data", str(data), "--out", str(out), "--size",
            str(SIZE), "--batch-size", "3", "--total-steps", "4", "--lr", "5e-2", "--log-every", "1",
            "--sample-every", "0", "--checkpoint-every", "2", "--device", "cpu", "--token", "myshape",
            "--vectors", "3", "--init-text", "a red circle", *extra]


def test_embedding_training_learns_only_the_vectors(data, model_file, tmp_path):
    seen = {}
    cfg = defaults("embedding").replace(data=str(data), init_from=str(model_file), size=SIZE, batch_size=3,
                                        total_steps=3, lr=5e-2, log_every=1, sample_every=3, sample_steps=2,
                                        checkpoint_every=3, device="cpu", token="myshape", vectors=3,
                                        init_text="a red circle")
    train(cfg, tmp_path / "run", on_step=lambda step, info: seen.update(net=info["net"]))
    net = seen["net"]
    assert [n for n, p in net.named_parameters()] == ["vectors"]
    assert set(read_checkpoint(tmp_path / "run")["net"]) == {"vectors"}
    base = load(model_file)
    trained = net.frozen.model.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in base.state_dict().items())  # the model is untouched
    # the vectors started as "a red circle"'s three token embeddings, and moved
    ids = base.tokenizer.encode("a red circle")
    start = base.text_encoder.text_model.embeddings.lookup(torch.tensor([ids]))[0]
    emb = load_embedding(tmp_path / "run" / "myshape.safetensors")
    assert emb.name == "myshape" and emb.n_vectors == 3
    assert torch.equal(emb.vectors[""], net.vectors.detach())
    assert not torch.allclose(emb.vectors[""], start)
    assert (tmp_path / "run" / "samples" / "step_0000003.png").exists()
    # the word in a prompt becomes exactly the trained vectors (what the loss saw)
    table_dir = tmp_path / "emb"
    table_dir.mkdir()
    (table_dir / "myshape.safetensors").write_bytes((tmp_path / "run" / "myshape.safetensors").read_bytes())
    chunk = tokenize_chunks(base.tokenizer, "a photo of myshape", EmbeddingTable(table_dir).matcher(
        base.tokenizer, TINY.text.width))[0]
    (offset, vec), = chunk.fixes
    assert offset == 3 and torch.equal(vec, emb.vectors[""])


def test_resumed_embedding_run_matches_uninterrupted(data, model_file, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli.main(_argv(data, model_file, a)) == 0
    stop_and_resume(_argv(data, model_file, b), b, 2, ["--vectors", "2"], "vectors: 3 in the run, 2 now", capsys)
    fa, _ = read_safetensors(a / "myshape.safetensors")
    fb, meta = read_safetensors(b / "myshape.safetensors")
    assert torch.equal(fa["emb_params"], fb["emb_params"]) and meta["name"] == "myshape"
    assert_same_losses(a, b, 4, tol=0)


def test_bad_settings_are_one_line(data, model_file, tmp_path, capsys):
    assert cli.main(["train", "embedding", "--model", str(model_file), "--data", str(data), "--out",
                     str(tmp_path / "x")]) == 2
    assert "--token" in capsys.readouterr().err
    assert cli.main([*_argv(data, model_file, tmp_path / "y")[:-6], "--token", "../evil"]) == 2
    err = capsys.readouterr().err
    assert "refused" in err and "Traceback" not in err
    assert not Path(tmp_path / "evil.safetensors").exists()


def test_out_file_writes_the_embedding_there(data, model_file, tmp_path):
    """`--out embeddings/mycat.safetensors` (the issue's command): that file is the embedding, the run folder is
    hidden beside it (an --embeddings-dir scan skips it), and --resume continues writing the same file."""
    folder = tmp_path / "embeddings"
    folder.mkdir()
    out = folder / "myshape.safetensors"
    run = folder / ".myshape.run"
    assert cli.main([*_argv(data, model_file, out), "--stop-after", "2"]) == 0
    assert run.is_dir() and read_checkpoint(run)["step"] == 2
    first = read_safetensors(out)[0]["emb_params"]
    assert cli.main(["train", "embedding", "--resume", str(run)]) == 0
    final = read_safetensors(out)[0]["emb_params"]
    assert torch.equal(final, read_safetensors(run / "myshape.safetensors")[0]["emb_params"])
    assert not torch.equal(first, final)
    assert [e.name for e in EmbeddingTable(folder).embeddings] == ["myshape"]  # the run folder is not scanned


def test_out_file_other_than_safetensors_is_one_line(data, model_file, tmp_path, capsys):
    assert cli.main(_argv(data, model_file, tmp_path / "myshape.pt")) == 2
    err = capsys.readouterr().err
    assert "myshape.safetensors" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / ".myshape.run").exists()
