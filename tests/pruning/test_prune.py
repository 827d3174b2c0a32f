"""End-to-end pruning of tiny Llama, GPT-2 and BERT models built from configs."""

import datasets
import pytest
import torch
from conftest import TINY_MODELS, char_tokenizer, tiny_gpt2, tiny_llama, token_ids

from peft_seft.pruning import SparsityReport, build_calibration, prune, sparsity_report
from peft_seft.pruning.blockwise import capture_block_inputs, find_blocks, prune_blockwise, run_block
from peft_seft.pruning.masks import magnitude_mask
from peft_seft.utils.sparsity import logical_weight, nm_group_counts
from peft_seft.utils.targets import find_target_linears

METHODS = ["magnitude", "wanda", "sparsegpt"]


def weights(model):
    return {name: logical_weight(module).detach().clone() for name, module in find_target_linears(model).items()}


def input_sq_norms(model, layer, ids):
    seen = []
    handle = layer.register_forward_hook(lambda module, inputs, output: seen.append((inputs[0] ** 2).sum((0, 1))))
    with torch.no_grad():
        model(ids)
    handle.remove()
    return seen[0]


@pytest.mark.parametrize("method", METHODS)
def test_exact_sparsity_and_nm_on_every_architecture(tiny_model, method):
    unstructured = type(tiny_model)(tiny_model.config)
    unstructured.load_state_dict(tiny_model.state_dict())
    report = prune(unstructured, method, 0.3, calibration=token_ids(), show_progress=False)
    for name, weight in weights(unstructured).items():
        in_features = weight.shape[1]
        if method == "sparsegpt":  # exact per layer
            assert int((weight != 0).sum()) == weight.numel() - round(0.3 * weight.numel()), name
        else:  # exact per output row
            assert (weight != 0).sum(1).eq(in_features - round(0.3 * in_features)).all(), name

    report = prune(tiny_model, method, pattern="2:4", calibration=token_ids(), show_progress=False)
    for name, weight in weights(tiny_model).items():
        assert (nm_group_counts(weight, 4) == 2).all(), name
    assert report.nm_compliant and report.sparsity == 0.5 and report.method == method


def test_report_numbers_and_table():
    model = tiny_llama()
    report = prune(model, "magnitude", 0.25, target_modules=["q_proj", "down_proj"])
    assert isinstance(report, SparsityReport)
    assert [layer.name for layer in report.layers] == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.mlp.down_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.mlp.down_proj",
    ]
    assert [layer.shape for layer in report.layers] == [(64, 64), (64, 128)] * 2
    assert [layer.nonzeros for layer in report.layers] == [64 * 48, 64 * 96] * 2
    assert report.numel == 2 * (64 * 64 + 64 * 128) and report.nonzeros == 2 * (64 * 48 + 64 * 96)
    assert report.sparsity == pytest.approx(0.25) and report.nm_compliant is None
    untouched = sparsity_report(model, target_modules=r".*\.k_proj")
    assert untouched.sparsity == 0.0 and len(untouched.layers) == 2

    with_pattern = sparsity_report(model, pattern="2:4", target_modules=["q_proj"])
    assert with_pattern.nm_compliant is False  # magnitude 25 % per row does not make every group 2:4
    table = str(with_pattern)
    assert table == with_pattern.to_table()
    assert "model.layers.1.self_attn.q_proj" in table and "25.00%" in table and "2:4 ok" in table
    assert table.splitlines()[-1].split()[:3] == ["total", "2", "layers"]


def test_wanda_uses_the_calibration_data():
    dense = tiny_llama()
    masks = {}
    for label, method, calibration in [
        ("magnitude", "magnitude", None),
        ("wanda-a", "wanda", token_ids(seed=1)),
        ("wanda-b", "wanda", token_ids(seed=2)[:, :8] % 7),  # short, low-diversity inputs: other column norms
    ]:
        model = tiny_llama()
        model.load_state_dict(dense.state_dict())
        prune(model, method, 0.5, calibration=calibration, show_progress=False)
        masks[label] = torch.cat([(w != 0).flatten() for w in weights(model).values()])
    assert not torch.equal(masks["wanda-a"], masks["magnitude"])
    assert not torch.equal(masks["wanda-a"], masks["wanda-b"])


def test_blocks_see_the_pruned_outputs_of_earlier_blocks():
    """Statistics of block 1 come from the pruned block 0: they equal those of a forward through the pruned model."""
    model = tiny_llama()
    targets = find_target_linears(model)
    ids = token_ids()
    recorded = {}

    def spy(name, module, stats):
        recorded[name] = stats.sq_norms.clone()
        weight = logical_weight(module)
        weight.masked_fill_(~magnitude_mask(weight, 0.5), 0)

    q_proj = model.model.layers[1].self_attn.q_proj
    dense_norms = input_sq_norms(model, q_proj, ids)
    prune_blockwise(model, targets, ids, "norms", spy, batch_size=3, show_progress=False)
    pruned_norms = input_sq_norms(model, q_proj, ids)
    recorded_norms = recorded["model.layers.1.self_attn.q_proj"]
    torch.testing.assert_close(recorded_norms, pruned_norms, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(recorded_norms, dense_norms, rtol=1e-3)


def test_captured_block_inputs_reproduce_the_model_forward(tiny_model):
    ids = token_ids(num_samples=5)
    _, blocks = find_blocks(tiny_model, list(find_target_linears(tiny_model)))
    expected = []
    handles = [
        block.register_forward_hook(lambda m, i, o: expected.append(o if torch.is_tensor(o) else o[0]))
        for block in blocks
    ]
    with torch.no_grad():
        tiny_model.eval()(ids)
    for handle in handles:
        handle.remove()
    batches = capture_block_inputs(tiny_model, blocks[0], ids, batch_size=5)
    with torch.no_grad():
        for block, reference in zip(blocks, expected, strict=True):
            batches[0].hidden_states = run_block(block, batches[0])
            torch.testing.assert_close(batches[0].hidden_states, reference)


def test_text_and_dataset_calibration():
    tokenizer = char_tokenizer()
    texts = ["def f(x):\n    return x + 1\n" * 4, "class A:\n    pass\n" * 6]
    ids = build_calibration(texts, tokenizer, num_samples=4, seq_len=16)
    assert ids.shape == (4, 16) and ids.dtype == torch.long
    first = tokenizer(texts[0], add_special_tokens=False)["input_ids"]
    second = tokenizer(texts[1], add_special_tokens=False)["input_ids"]
    assert ids.flatten().tolist() == (first + [tokenizer.eos_token_id] + second)[:64]
    from_dataset = build_calibration(datasets.Dataset.from_dict({"text": texts}), tokenizer, num_samples=4, seq_len=16)
    assert torch.equal(from_dataset, ids)
    pretokenized = datasets.Dataset.from_dict({"input_ids": [[1, 2, 3] * 4, [4, 5] * 6]})
    assert build_calibration(pretokenized, num_samples=2, seq_len=12).tolist() == [[1, 2, 3] * 4, [4, 5] * 6]
    assert build_calibration(torch.arange(10), seq_len=4).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert build_calibration(torch.ones(3, 9, dtype=torch.int32), num_samples=2, seq_len=5).shape == (2, 5)

    model = tiny_gpt2()
    report = prune(model, "sparsegpt", 0.5, calibration=texts, tokenizer=tokenizer, seq_len=16, show_progress=False)
    assert report.sparsity == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "random", "sparsity": 0.5}, "choose one of magnitude, wanda, sparsegpt"),
        ({"method": "magnitude", "sparsity": 1.0}, r"in \[0, 1\)"),
        ({"method": "magnitude", "sparsity": -0.1}, r"in \[0, 1\)"),
        ({"method": "magnitude"}, "needs a sparsity"),
        ({"method": "wanda", "pattern": "2:4", "sparsity": 0.7}, "implies sparsity 0.5"),
        ({"method": "wanda", "pattern": "2-4"}, "like '2:4'"),
        ({"method": "magnitude", "pattern": "2:3"}, "divisible by 3"),
        ({"method": "wanda", "sparsity": 0.5}, "needs calibration data"),
        ({"method": "wanda", "sparsity": 0.5, "calibration": []}, "calibration data is empty"),
        ({"method": "sparsegpt", "sparsity": 0.5, "calibration": torch.zeros(0, 8, dtype=torch.long)}, "empty"),
        ({"method": "wanda", "sparsity": 0.5, "calibration": ["some text"]}, "needs a tokenizer"),
        ({"method": "wanda", "sparsity": 0.5, "calibration": torch.rand(2, 8)}, "integer tensor"),
        ({"method": "wanda", "sparsity": 0.5, "calibration": {"x": 1}}, "a list of texts"),
        ({"method": "magnitude", "sparsity": 0.5, "target_modules": ["nothing"]}, "No linear layer"),
    ],
)
def test_bad_input_is_a_clear_error(kwargs, message):
    model = tiny_llama()
    before = weights(model)
    with pytest.raises(ValueError, match=message):
        prune(model, **kwargs)
    assert all(torch.equal(before[name], weight) for name, weight in weights(model).items())


def test_pruned_model_round_trips_through_save_pretrained(tmp_path):
    model = tiny_llama()
    prune(model, "wanda", pattern="2:4", calibration=token_ids(), show_progress=False)
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path)
    for name, weight in weights(reloaded).items():
        assert torch.equal(weight, weights(model)[name]), name
    report = sparsity_report(reloaded, pattern="2:4")
    assert report.nm_compliant and report.sparsity == 0.5


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_pruning_restores_training_mode(name):
    model = TINY_MODELS[name]().train()
    prune(model, "sparsegpt", 0.5, calibration=token_ids(num_samples=2), show_progress=False)
    assert model.training
