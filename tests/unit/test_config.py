"""The flow's parameter model refuses bad input with a message that names the fix."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from visionpipe.config import FinetuneConfig, PipelineConfig, RegistryConfig, mlflow_alias_problem, quickstart


@pytest.mark.parametrize(("patch", "message"), [
    ({"finetune": {"arch": "resnet5"}}, "'resnet5' is not a torchvision classification backbone"),
    ({"finetune": {"arch": "squeezenet1_0"}}, "SqueezeNet has no Linear classifier"),
    ({"finetune": {"arch": "googlenet"}}, "googlenet.\\* trains GoogLeNet"),
    ({"finetune": {"arch": "vit_b_16"}, "data": {"image_size": 40},
      "weights": {"uri": "torchvision:vit_b_16.IMAGENET1K_V1"}}, "must be a multiple of 16, e.g. 32"),
    ({"finetune": {"phases": [{"name": "full", "trainable": ["*"], "epochs": 0, "lr": 0.1}]}},
     "greater than 0"),
    ({"finetune": {"phases": [{"name": "full", "trainable": ["*"], "epochs": 1, "lr": 0.1,
                               "backbone_lr_fraction": 1.5}]}}, "less than or equal to 1"),
    ({"googlenet": {"epochs": -1}}, "greater than 0"),
    ({"weights": {"sha256": "abc"}}, "64 hex digits"),
    ({"weights": {"uri": "torchvision:resnet18.IMAGENET1K_V1"}}, "finetune.arch is 'resnet50'"),
    ({"googlenet": {"launch": {"nnodes": "0:2"}}}, "min:max"),
    ({"finetune": {"launch": {"nnodes": "2", "rdzv_endpoint": "10.0.0.5:29400"}}},
     "finetune.launch\n.*this stage runs on one node .* set nnodes to '1'"),
    ({"data": {"sourc": "digits"}}, "Extra inputs are not permitted"),
    ({"registry": {"alias": "latest"}}, "'latest' alias name .* is reserved"),
    ({"registry": {"alias": "v2"}}, "Version alias name 'v2' is reserved"),
    ({"registry": {"alias": "night/ly"}}, "Invalid alias name"),
    ({"registry": {"alias": ""}}, "cannot be empty"),
])
def test_invalid_parameters_are_refused_with_the_fix(patch: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        PipelineConfig.model_validate(patch)


def test_defaults_and_quickstart() -> None:
    default = PipelineConfig()
    assert default.finetune.arch == "resnet50" and default.weights.on_unavailable == "fail"
    assert [p.name for p in default.finetune.phases] == ["head", "full"]
    assert quickstart().weights.on_unavailable == "random-init"
    assert default.model_name == "digits-classifier"
    assert PipelineConfig.model_validate_json(default.model_dump_json()) == default


def test_the_form_schema_shows_enums_and_bounds() -> None:
    schema = PipelineConfig.model_json_schema()
    finetune = schema["$defs"]["FinetuneConfig"]["properties"]
    # Any torchvision model by name: a text field with examples, checked when submitted.
    assert finetune["arch"]["default"] == "resnet50" and "vit_b_16" in finetune["arch"]["examples"]
    assert schema["$defs"]["Phase"]["properties"]["epochs"]["exclusiveMinimum"] == 0


@pytest.mark.parametrize(("alias", "message"), [
    ("", "cannot be empty"),
    ("night/ly", "Invalid alias name: 'night/ly'"),
    ("champion ", "Invalid alias name"),
    ("champion\n", "Invalid alias name"),  # MLflow's '$' would let a trailing newline through
    ("a" * 256, "256 characters, more than MLflow's 255"),
    ("latest", "'latest' alias name .* is reserved"),
    ("LaTeSt", "'latest' alias name .* is reserved"),
    ("v2", "Version alias name 'v2' is reserved"),
    ("V17", "Version alias name 'V17' is reserved"),
])
def test_each_alias_mlflow_refuses_is_refused_with_the_fix(alias: str, message: str) -> None:
    with pytest.raises(ValidationError, match=f"{message}.*Fix: choose another alias"):
        RegistryConfig(alias=alias)


@pytest.mark.parametrize("alias", ["champion", "challenger-2", "night_ly", "v2a", "version3",
                                   "latest-good", "a" * 255, "Meister\u00e9"])
def test_aliases_mlflow_accepts_are_accepted(alias: str) -> None:
    assert RegistryConfig(alias=alias).alias == alias


@pytest.mark.parametrize("alias", ["", "night/ly", "a" * 255, "a" * 256, "latest", "LATEST",
                                   "v2", "V2", "v2a", "champion", "x.y", "\u00e9t\u00e9"])
def test_the_alias_rule_is_mlflows_own(alias: str) -> None:
    """Our copy of the rule agrees with the installed MLflow's private validators."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import (
        _validate_model_alias_name,
        _validate_model_alias_name_reserved,
    )

    try:
        _validate_model_alias_name(alias)
        _validate_model_alias_name_reserved(alias)
        mlflow_accepts = True
    except MlflowException:
        mlflow_accepts = False
    assert (mlflow_alias_problem(alias) is None) == mlflow_accepts


def test_no_form_description_loses_a_placeholder_to_the_uis_markdown() -> None:
    """The Prefect UI renders field descriptions as markdown: a bare <arch> is an HTML tag and
    vanishes from the form (seen in headless Chromium); placeholders stand in backticks."""
    import json
    import re

    schema = json.dumps(PipelineConfig.model_json_schema())
    descriptions = re.findall(r'"description": "((?:[^"\\]|\\.)*)"', schema)
    assert len(descriptions) > 50
    bare = [d for d in descriptions if re.search(r"<[A-Za-z]", re.sub(r"`[^`]*`", "", d))]
    assert not bare, bare


def test_the_finetune_takes_every_visible_gpu_or_one_plain_process_on_the_cpu() -> None:
    from visionpipe.training.jobs import finetune_processes

    assert finetune_processes(FinetuneConfig(launch={"nproc_per_node": 3})) == 3
    assert finetune_processes(FinetuneConfig(device="cpu")) == 1
    assert finetune_processes(FinetuneConfig(launch={"backend": "gloo"})) == 1
    assert finetune_processes(FinetuneConfig()) == max(1, torch.cuda.device_count())


@pytest.mark.parametrize("alias", ["champion", "prod-1", "v2a", "latestx", "é", "latest", "LATEST",
                                   "v2", "V12", "night/ly", "", "a" * 256])
def test_the_forms_alias_pattern_refuses_what_mlflow_refuses(alias: str) -> None:
    """The Prefect UI checks the JSON schema's pattern before a run starts; it must agree with
    the validator whose messages name the fix."""
    import jsonschema

    schema = PipelineConfig.model_json_schema()["$defs"]["RegistryConfig"]["properties"]["alias"]
    schema_ok = jsonschema.Draft202012Validator(schema).is_valid(alias)
    assert schema_ok == (mlflow_alias_problem(alias) is None)
