"""The trainer's config: files, --set overrides, and errors that name the key, the value and what
is allowed."""

import os

import pytest

pytest.importorskip("transformers")

from fastkd.train.config import Config, ConfigError, load_config, parse_overrides  # noqa: E402


@pytest.fixture
def paths(tmp_path):
    (tmp_path / "student").mkdir()
    (tmp_path / "teacher").mkdir()
    (tmp_path / "train.txt").write_text("hello")
    return tmp_path


def _base(paths) -> dict:
    return {
        "model": {"student": str(paths / "student"), "teacher": str(paths / "teacher")},
        "data": {"train": [str(paths / "train.txt")]},
    }


def test_toml_file_with_overrides_and_relative_paths(paths):
    cfg = paths / "run.toml"
    cfg.write_text(
        '[model]\nstudent = "student"\nteacher = "teacher"\n'
        '[data]\ntrain = ["train.txt"]\nseq_len = 64\n'
        '[objective]\ndivergence = "jsd"\nbeta = 0.25\n'
    )
    config = load_config(
        str(cfg),
        ["train.lr=1e-3", "objective.t2_scale=true", "output.dir=out", "train.max_grad_norm=none"],
    )
    assert config.model.student == str(paths / "student")  # relative to the file
    assert config.data.train == [str(paths / "train.txt")]
    assert config.data.seq_len == 64 and config.objective.beta == 0.25
    assert config.train.lr == 1e-3 and config.objective.t2_scale is True
    assert config.train.max_grad_norm is None
    assert Config.from_dict(config.to_dict()).to_dict() == config.to_dict()


def test_yaml_file(paths):
    pytest.importorskip("yaml")
    cfg = paths / "run.yaml"
    cfg.write_text(
        "model:\n  student: student\n  teacher: teacher\ndata:\n  train: train.txt\n"
        "train:\n  steps: 7\n"
    )
    config = load_config(str(cfg))
    assert config.train.steps == 7 and config.data.train == [str(paths / "train.txt")]


@pytest.mark.parametrize(
    "tree,message",
    [
        ({"trian": {}}, r"unknown key trian; did you mean train\?"),
        ({"train": {"lr_rate": 1}}, r"unknown key train.lr_rate; did you mean train.lr\?"),
        ({"train": {"steps": 0}}, r"train.steps = 0 is not allowed: expected a number >= 1"),
        ({"train": {"steps": 2.5}}, r"train.steps = 2.5 .*an integer >= 1"),
        ({"train": {"compile": "yes"}}, r"train.compile = 'yes' .*true or false"),
        ({"objective": {"beta": 1.5}}, r"objective.beta = 1.5 .*\[0.0, 1.0\]"),
        ({"objective": {"kind": "dpo"}}, r"objective.kind = 'dpo' .*one of 'ce', 'kd', 'sparse'"),
        ({"objective": {"divergence": "kl"}}, r"objective.divergence = 'kl' .*one of \["),
        ({"objective": {"temperature": float("nan")}}, r"objective.temperature = nan"),
        ({"objective": {"kind": "sparse"}}, r"needs cache.path"),
        ({"objective": {"kind": "ce", "hard_weight": 0.5}}, r"hard_weight applies to kind"),
        ({"model": {"teacher": None}}, r'"kd" needs model.teacher'),
        ({"data": {"train": [1]}}, r"data.train\[0\] = 1 .*a string"),
        ({"train": "fast"}, r"train must be a table of keys"),
        ({"train": {"adam_beta1": 1.0}}, r"train.adam_beta1 = 1.0 .*\[0.0, 1.0\)"),
        (
            {"objective": {"kind": "sparse", "temperature": 2.0}, "cache": {"path": "c"}},
            r"objective.temperature = 2.0 applies to kind = \"kd\"",
        ),
        ({"data": {"format": "text"}}, r"data.format = 'text' .*'auto', 'txt', 'jsonl'"),
    ],
)
def test_bad_values_name_the_key_value_and_what_is_allowed(paths, tree, message):
    base = _base(paths)
    for section, values in tree.items():
        base[section] = (
            values
            if not isinstance(values, dict) or section not in base
            else {**base[section], **values}
        )
    with pytest.raises(ConfigError, match=message):
        load_config(base)


def test_missing_paths_are_named(paths):
    base = _base(paths)
    base["data"]["train"].append(str(paths / "nope.txt"))
    with pytest.raises(ConfigError, match=r"data.train\[1\]: no such file .*nope.txt"):
        load_config(base)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(paths / "missing.toml"))


def test_required_keys(paths):
    with pytest.raises(ConfigError, match="model.student is required"):
        load_config({"data": {"train": [str(paths / "train.txt")]}})
    with pytest.raises(ConfigError, match="data.train is required"):
        load_config({"model": {"student": str(paths / "student")}, "objective": {"kind": "ce"}})


def test_overrides_parse_toml_values_else_strings():
    tree = parse_overrides(["a.b=3", "a.c=[1, 2]", "a.d=hello world", 'a.e="x"', "f=none"])
    assert tree == {"a": {"b": 3, "c": [1, 2], "d": "hello world", "e": "x"}, "f": None}
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_overrides(["novalue"])
    with pytest.raises(ConfigError, match="empty key part"):
        parse_overrides(["a..b=1"])


def test_invalid_toml_is_a_config_error(paths):
    cfg = paths / "bad.toml"
    cfg.write_text("[model\nstudent = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(str(cfg))
    assert os.path.isfile(cfg)


def test_example_configs_are_valid():
    root = os.path.join(os.path.dirname(__file__), "..", "examples")
    names = sorted(n for n in os.listdir(root) if n.endswith((".toml", ".yaml")))
    assert names
    for name in names:
        config = load_config(os.path.join(root, name), check_paths=False)
        assert config.model.student and config.data.train, name


def test_data_format_reaches_the_reader(paths):
    """Every data.format the config admits is one the reader takes."""
    from fastkd.train.data import read_documents

    for fmt in ("auto", "txt"):
        config = load_config(
            {**_base(paths), "data": {"train": [str(paths / "train.txt")], "format": fmt}}
        )
        assert read_documents(config.data.train, format=config.data.format)[0].text == "hello"
