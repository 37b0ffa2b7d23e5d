"""Policy specs (``vrex.kv.policies.spec``): the one grammar of --policy and make_policy, checked without a model."""

import math

import pytest

from vrex.kv.policies import POLICIES, PolicySpecError, ReKVPolicy, make_policy, parse_policy_spec, policy_params
from vrex.kv.policies.spec import describe, param_table, split_spec_list


@pytest.mark.parametrize("spec, name, kwargs", [
    ("resv", "resv", {}),
    ("resv[]", "resv", {}),
    ("resv[ratio=0.2,hamming_threshold=4]", "resv", {"ratio": 0.2, "hamming_threshold": 4}),
    (" resv [ ratio = 0.2 , score_norm = softmax ] ", "resv", {"ratio": 0.2, "score_norm": "softmax"}),
    ("resv[score_norm='softmax',ratio=0.95,hamming_threshold=4]", "resv", {"score_norm": "softmax", "ratio": 0.95, "hamming_threshold": 4}),
    ("RESV_NOCLUST[ratio=1]", "resv-noclust", {"ratio": 1.0}),
    ("infinigen[budget=None,prefill=false,aggregate=max_logit]", "infinigen", {"budget": None, "prefill": False, "aggregate": "max_logit"}),
    ("streamingllm[sink=0,window=64]", "streamingllm", {"sink": 0, "window": 64}),
])
def test_good_specs_parse_to_typed_kwargs(spec, name, kwargs):
    got_name, got = parse_policy_spec(spec)
    assert (got_name, got) == (name, kwargs)
    assert all(type(got[k]) is type(v) for k, v in kwargs.items())  # 1 -> 1.0 where a float is expected


def test_spec_and_keywords_build_the_same_policy():
    a = make_policy("rekv[ratio=0.25,similarity=cosine]")
    b = make_policy("rekv", ratio=0.25, similarity="cosine")
    assert a == b and a.ratio == 0.25 and a.similarity == "cosine"
    assert make_policy("resv[ratio=0.2]").ratio == 0.2
    with pytest.raises(PolicySpecError, match="both set ratio"):
        make_policy("resv[ratio=0.2]", ratio=0.3)


def test_every_default_passes_its_own_checks():
    """Each parameter written back with its default builds the policy: the type annotations and the
    range checks agree with the defaults."""
    for name in POLICIES:
        for param, default in policy_params(name).items():
            policy = make_policy(f"{name}[{param}={default!r}]")
            assert getattr(policy, param) == default, (name, param)


def test_unknown_policy_lists_the_valid_ones():
    for spec in ("bogus", "bogus[ratio=1]", "[ratio=1]"):
        with pytest.raises(PolicySpecError) as e:
            parse_policy_spec(spec)
        assert all(n in str(e.value) for n in POLICIES), str(e.value)
    assert "'bogus'" in str(pytest.raises(PolicySpecError, parse_policy_spec, "bogus").value)


def test_unknown_parameter_is_named_with_the_allowed_ones_and_defaults():
    with pytest.raises(PolicySpecError) as e:
        parse_policy_spec("resv[nonsense=1]")
    msg = str(e.value)
    assert "'nonsense'" in msg and "'resv'" in msg
    for param, default in policy_params("resv").items():
        assert f"{param}={default!r}" in msg
    with pytest.raises(PolicySpecError, match="'ratioo'.*n_hyperplanes=32"):
        make_policy("resv", ratioo=0.3)  # the keyword API goes through the same check


@pytest.mark.parametrize("spec, param, value, allowed", [
    ("resv[ratio=abc]", "ratio", "'abc'", "a number"),
    ("resv[ratio='x']", "ratio", "'x'", "a number"),
    ("resv[ratio=nan]", "ratio", "'nan'", "a number"),
    ("infinigen[budget=1.5]", "budget", "1.5", "an integer or None"),
    ("infinigen[prefill=1]", "prefill", "1", "true/false"),
    ("resv[seed=True]", "seed", "True", "an integer"),
    ("rekv[similarity=3]", "similarity", "3", "a string"),
])
def test_wrong_type_names_parameter_value_and_type(spec, param, value, allowed):
    with pytest.raises(PolicySpecError) as e:
        make_policy(spec)
    msg = str(e.value)
    assert f"{param}={value}" in msg and allowed in msg, msg


@pytest.mark.parametrize("spec, param, allowed", [
    ("rekv[ratio=2]", "ratio=2.0", "(0, 1]"),
    ("rekv[ratio=0]", "ratio=0.0", "(0, 1]"),
    ("rekv[max_ratio=1.5]", "max_ratio=1.5", "(0, 1]"),
    ("rekv[top_frames=0]", "top_frames=0", "integer >= 1"),
    ("rekv[similarity=euclid]", "similarity='euclid'", "'dot' or 'cosine'"),
    ("infinigen[ratio=-0.1]", "ratio=-0.1", "(0, 1]"),
    ("infinigen[ratio=1e999]", "ratio=inf", "(0, 1]"),
    ("infinigen[budget=0]", "budget=0", "integer >= 1"),
    ("infinigen[aggregate=mean]", "aggregate='mean'", "'softmax_sum' or 'max_logit'"),
    ("streamingllm[window=-1]", "window=-1", "integer >= 0"),
    ("streamingllm[sink=-4]", "sink=-4", "integer >= 0"),
    ("resv[ratio=-1]", "ratio", "-1.0"),  # resv.py words its own checks: the parameter and the value are named
    ("resv[score_norm=foo]", "score_norm", "softmax"),
    ("resv[n_hyperplanes=0]", "n_hyperplanes", ">= 1"),
])
def test_out_of_range_names_parameter_value_and_range(spec, param, allowed):
    with pytest.raises(PolicySpecError) as e:
        make_policy(spec)
    msg = str(e.value)
    assert param in msg and allowed in msg, msg


def test_resv_ratio_above_one_is_refused():
    with pytest.raises(PolicySpecError, match="ratio"):
        make_policy("resv[ratio=2]")


def test_direct_construction_gets_the_range_checks():
    with pytest.raises(PolicySpecError, match=r"'rekv': ratio=2 .*\(0, 1\]"):
        ReKVPolicy(ratio=2)
    with pytest.raises(ValueError):  # PolicySpecError is a ValueError: existing callers keep working
        ReKVPolicy(ratio=math.nan)


@pytest.mark.parametrize("spec, what", [
    ("resv[ratio=0.2", "ending with ']'"),
    ("resv[ratio]", "'ratio' is not key=value"),
    ("resv[=1]", "'=1' is not key=value"),
    ("resv[ratio=]", "'ratio' has no value"),
    ("resv[ratio=1,ratio=2]", "'ratio' is given twice"),
    ("resv[ratio=@]", "ratio=@ is neither a Python literal nor a bare word"),
    ("resv[score_norm='a]", "unbalanced"),
])
def test_syntax_errors_quote_the_spec(spec, what):
    with pytest.raises(PolicySpecError) as e:
        parse_policy_spec(spec)
    assert what in str(e.value) and spec in str(e.value)


def test_spec_lists_split_outside_brackets_and_quotes():
    assert split_spec_list("all,resv[ratio=0.2,seed=1], rekv") == ["all", "resv[ratio=0.2,seed=1]", "rekv"]
    assert split_spec_list("resv[score_norm='a,b'],full") == ["resv[score_norm='a,b']", "full"]


def test_descriptions_and_parameter_tables_come_from_the_policies():
    assert describe("resv").startswith("ReSV dynamic KV retrieval")
    assert describe("streamingllm").startswith("attention sinks")
    table = {p: (d, kind) for p, d, kind in param_table("infinigen")}
    assert table == {"ratio": (0.5, "a number"), "budget": (None, "an integer or None"), "max_ratio": (0.5, "a number"),
                     "prefill": (True, "true/false"), "aggregate": ("softmax_sum", "a string")}
    assert param_table("full") == []
