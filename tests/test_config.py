"""The two TorchServe configs: the production one is derived, never hand-edited."""
import pytest

from repo import REPO_ROOT
from serving.server.properties import PRODUCTION_OVERRIDES, instance_config, production_config, read_properties, set_properties


def test_committed_production_config_is_the_derived_one():
    derived = production_config((REPO_ROOT / "config.properties").read_text())
    assert (REPO_ROOT / "config.production.properties").read_text() == derived, \
        "config.production.properties is stale: run `make config.production.properties`"


def test_production_differs_from_the_base_only_by_its_overrides():
    base = read_properties(REPO_ROOT / "config.properties")
    production = read_properties(REPO_ROOT / "config.production.properties")
    changed = {key for key in base.keys() | production.keys() if base.get(key) != production.get(key)}
    assert changed == set(PRODUCTION_OVERRIDES)
    assert production["disable_token_authorization"] == "false" and base["disable_token_authorization"] == "true"


def test_set_properties_replaces_appends_and_refuses_duplicates():
    text = "# a=comment\na=1\nb=2\n"
    assert set_properties(text, {"a": "9", "c": "3"}) == "# a=comment\na=9\nb=2\nc=3\n"
    with pytest.raises(ValueError, match="set 2 times"):
        set_properties("a=1\na=2\n", {"a": "3"})


def test_instance_config_moves_every_port_and_the_store(tmp_path):
    path, inference, management = instance_config(REPO_ROOT / "config.properties", tmp_path, tmp_path / "store")
    settings = read_properties(path)
    base = read_properties(REPO_ROOT / "config.properties")
    for key in ("inference_address", "management_address", "metrics_address", "grpc_inference_port"):
        assert settings[key] != base[key]
    assert settings["inference_address"] == inference and settings["model_store"] == str(tmp_path / "store")


CONFIGS = ["config.properties", "config.production.properties"]
MIB = 1024 * 1024
HEAP_UNITS = {"k": 1024, "m": MIB, "g": 1024 * MIB}


def heap_cap_bytes(vmargs: str) -> int:
    [cap] = [arg[4:] for arg in vmargs.split() if arg.startswith("-Xmx")]
    return int(cap[:-1]) * HEAP_UNITS[cap[-1].lower()] if cap[-1].isalpha() else int(cap)


@pytest.mark.parametrize("name", CONFIGS)
def test_the_jvm_has_a_heap_cap_that_the_queued_bodies_fit_in(name):
    properties = read_properties(REPO_ROOT / name)
    assert "-XX:+ExitOnOutOfMemoryError" in properties["vmargs"].split()
    queued = int(properties["job_queue_size"]) * int(properties["max_request_size"])
    assert queued <= heap_cap_bytes(properties["vmargs"]) / 2, "queued bodies alone could fill half the heap"


@pytest.mark.parametrize("name", CONFIGS)
def test_no_url_is_allowed_and_management_fetches_nothing(name):
    """allowed_urls is a comma-separated list of Java regexes, each matched against the whole URL
    (Pattern.matcher(url).matches(), which fullmatch mirrors for these plain patterns)."""
    import re
    properties = read_properties(REPO_ROOT / name)
    patterns = properties["allowed_urls"].split(",")
    for url in ("file:///tmp/x.war", "http://127.0.0.1/x.mar", "https://example.com/x.war", "s3://b/x.mar"):
        assert not any(re.fullmatch(pattern, url, re.I) for pattern in patterns), url
    assert properties["enable_model_api"] == "false" and properties["workflow_store"]
    assert properties["cors_allowed_methods"] == "POST"   # the page only posts multipart forms


def test_the_handlers_answer_bound_sits_under_max_response_size_in_every_config():
    """Issue 27 point 2: TorchServe kills the worker whose answer passes max_response_size, and the
    worker cannot read that setting; the handler's own bound must leave room for the frame."""
    from serving.handler.parsing import MAX_ANSWER_BYTES

    for config in ("config.properties", "config.production.properties"):
        limit = int(read_properties(REPO_ROOT / config)["max_response_size"])
        assert MAX_ANSWER_BYTES + 64 * 1024 <= limit, (config, MAX_ANSWER_BYTES, limit)
