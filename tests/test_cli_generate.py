"""`parscale generate` end to end, in-process."""

import pytest
import torch

from parscale import ParScaleForCausalLM
from parscale.cli import main


@pytest.fixture
def ckpt(tmp_path, tiny_config):
    torch.manual_seed(0)
    model = ParScaleForCausalLM(tiny_config(P=2, stream_sets=[2, 4]))
    model.save_pretrained(tmp_path / "m")
    return tmp_path / "m", model


def test_generate_ids_greedy_matches_the_api(ckpt, capsys):
    path, model = ckpt
    assert main(["generate", "--model", str(path), "--ids", "1 2 3", "--max-new-tokens", "5", "--streams", "4"]) == 0
    expect = model.set_streams(4).generate(torch.tensor([[1, 2, 3]]), max_new_tokens=5)[0].tolist()
    assert capsys.readouterr().out.split() == [str(t) for t in expect]


def test_generate_with_tokenizer_json(ckpt, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers

    path, _ = ckpt
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(53)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    assert main(["generate", "--model", str(path), "--prompt", "w1 w2", "--max-new-tokens", "3",
                 "--do-sample", "--seed", "1", "--num-return-sequences", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("--- sample") == 2 and "w1 w2" in out


@pytest.mark.parametrize("argv,msg", [
    (["--ids", "1 x"], "--ids must be integers"),
    (["--ids", "1", "--streams", "3"], "no stream set for P=3"),
    (["--ids", "1", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--prompt", "hi"], "no tokenizer.json"),
])
def test_generate_bad_flags_exit_2_with_one_line(ckpt, capsys, argv, msg):
    path, _ = ckpt
    assert main(["generate", "--model", str(path), *argv]) == 2
    err = capsys.readouterr().err
    assert msg in err and err.count("\n") == 1
