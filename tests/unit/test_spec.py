"""CNI request validation and result rendering (`trellis.cni.spec`): tables, no agent, no root."""

from __future__ import annotations

import ipaddress
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers import OMIT, cni_env, net_conf
from trellis.cni.client import SUPPORTED_VERSIONS
from trellis.cni.spec import (
    AddResult,
    CniError,
    Code,
    Interface,
    error_version,
    parse_request,
    prev_result_address,
    render_result,
)
from trellis.model.ipam import Attachment

PREV_RESULT = {"cniVersion": "1.1.0", "ips": [{"address": "10.244.0.7/32", "interface": 1}]}
"""A minimal ADD result, as a runtime hands it back to CHECK."""

REQUIRED = [
    ("ADD", ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH")),
    ("CHECK", ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH")),
    ("DEL", ("CNI_CONTAINERID", "CNI_IFNAME", "CNI_PATH")),
    ("GC", ("CNI_PATH",)),
    ("STATUS", ("CNI_PATH",)),
]


def _conf_for(command: str, **changes: Any) -> bytes:
    """A config valid for `command` (CHECK needs a prevResult)."""
    if command == "CHECK":
        changes.setdefault("prevResult", PREV_RESULT)
    return net_conf(**changes)


def _rejected(env: dict[str, str], stdin: bytes) -> CniError:
    with pytest.raises(CniError) as info:
        parse_request(env, stdin)
    return info.value


@pytest.mark.parametrize(
    ("command", "variable"),
    [(command, variable) for command, variables in REQUIRED for variable in variables],
)
@pytest.mark.parametrize("absent", [OMIT, ""], ids=["missing", "empty"])
def test_each_required_variable_is_named_when_absent(command: str, variable: str, absent: str) -> None:
    """Every variable a command needs gives code 4 naming it, whether unset or empty."""
    err = _rejected(cni_env(command, **{variable: absent}), _conf_for(command))
    assert err.code == Code.INVALID_ENVIRONMENT
    assert variable in err.msg and command in err.msg


@pytest.mark.parametrize(("command", "_variables"), REQUIRED)
def test_each_command_accepts_a_complete_request(command: str, _variables: tuple[str, ...]) -> None:
    """A complete environment and config parse, keeping command, version, network and attachment."""
    request = parse_request(cni_env(command), _conf_for(command, cniVersion="0.4.0"))
    assert (request.command, request.version, request.network) == (command, "0.4.0", "trellis")
    assert request.attachment == Attachment("c0ffee", "eth0")


@pytest.mark.parametrize("command", [OMIT, "", "add", "DELETE"])
def test_unknown_command_is_invalid_environment(command: str) -> None:
    """CNI_COMMAND outside the spec's six gives code 4 naming CNI_COMMAND."""
    err = _rejected(cni_env("ADD", CNI_COMMAND=command), net_conf())
    assert err.code == Code.INVALID_ENVIRONMENT and "CNI_COMMAND" in err.msg


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("CNI_CONTAINERID", "-leading-dash"),
        ("CNI_CONTAINERID", "a/b"),
        ("CNI_CONTAINERID", "a b"),
        ("CNI_CONTAINERID", "semi;colon"),
        ("CNI_IFNAME", "x" * 16),
        ("CNI_IFNAME", "."),
        ("CNI_IFNAME", ".."),
        ("CNI_IFNAME", "eth/0"),
        ("CNI_IFNAME", "eth:0"),
        ("CNI_IFNAME", "eth 0"),
        ("CNI_IFNAME", "eth\t0"),
    ],
)
def test_bad_container_id_or_ifname_is_named(variable: str, value: str) -> None:
    """An invalid container ID or interface name gives code 4 naming the variable and the value."""
    err = _rejected(cni_env("ADD", **{variable: value}), net_conf())
    assert err.code == Code.INVALID_ENVIRONMENT
    assert variable in err.msg and repr(value) in err.msg


@pytest.mark.parametrize(
    ("variable", "value"),
    [("CNI_CONTAINERID", "a" * 64), ("CNI_CONTAINERID", "pod_1.2-3"), ("CNI_IFNAME", "x" * 15)],
)
def test_good_container_id_and_ifname_pass(variable: str, value: str) -> None:
    """Long hex IDs, the allowed punctuation and 15-character interface names are accepted."""
    request = parse_request(cni_env("ADD", **{variable: value}), net_conf())
    assert value in (request.container_id, request.ifname)


@pytest.mark.parametrize(
    ("cni_args", "args", "pod"),
    [
        ("", {}, "c0ffee"),
        (
            "K8S_POD_NAMESPACE=ns;K8S_POD_NAME=web",
            {"K8S_POD_NAMESPACE": "ns", "K8S_POD_NAME": "web"},
            "ns/web",
        ),
        ("IgnoreUnknown=1;K8S_POD_NAME=web;", {"IgnoreUnknown": "1", "K8S_POD_NAME": "web"}, "c0ffee"),
        ("A=b=c;E=", {"A": "b=c", "E": ""}, "c0ffee"),
    ],
)
def test_cni_args_are_parsed(cni_args: str, args: dict[str, str], pod: str) -> None:
    """CNI_ARGS KEY=VALUE pairs are split on ';' and the first '='; the pod name comes from them."""
    request = parse_request(cni_env("ADD", CNI_ARGS=cni_args), net_conf())
    assert request.args == args
    assert request.pod == pod


@pytest.mark.parametrize("cni_args", ["novalue", "=x", "A=1;;broken"])
def test_bad_cni_args_are_named(cni_args: str) -> None:
    """A CNI_ARGS item that is not KEY=VALUE gives code 4 naming CNI_ARGS."""
    err = _rejected(cni_env("ADD", CNI_ARGS=cni_args), net_conf())
    assert err.code == Code.INVALID_ENVIRONMENT and "CNI_ARGS" in err.msg


@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
def test_supported_versions_are_chosen(version: str) -> None:
    """Each supported cniVersion is the request's version."""
    assert parse_request(cni_env("ADD"), net_conf(cniVersion=version)).version == version


@pytest.mark.parametrize("version", ["0.1.0", "0.2.0", "1.2.0", "2.0.0", "1.0"])
def test_unsupported_version_is_incompatible(version: str) -> None:
    """An unsupported cniVersion gives code 1 naming it and listing the supported ones."""
    err = _rejected(cni_env("ADD"), net_conf(cniVersion=version))
    assert err.code == Code.INCOMPATIBLE_VERSION
    assert repr(version) in err.msg and "1.1.0" in err.details


@pytest.mark.parametrize(
    ("stdin", "words"),
    [
        (b"", "not JSON"),
        (b"{not json", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[" * 100_000, "not JSON"),
        (b"[1, 2]", "list"),
        (b'"text"', "str"),
    ],
    ids=["empty", "broken", "not-utf8", "nested-too-deep", "list", "string"],
)
def test_undecodable_config_is_decode_failure(stdin: bytes, words: str) -> None:
    """stdin that is no JSON object gives code 6 (and never an uncaught exception)."""
    err = _rejected(cni_env("ADD"), stdin)
    assert err.code == Code.DECODE_FAILURE and words in err.msg


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("cniVersion", OMIT),
        ("cniVersion", 1),
        ("name", OMIT),
        ("name", ""),
        ("name", "bad name"),
        ("name", "-dash"),
        ("name", 7),
        ("type", OMIT),
        ("type", "bridge"),
        ("mtu", "1500"),
        ("mtu", 575),
        ("mtu", 65536),
        ("mtu", -1),
        ("mtu", True),
        ("mtu", 1500.0),
        ("prevResult", [1]),
        ("prevResult", "x"),
    ],
)
def test_invalid_config_names_key_and_value(key: str, value: Any) -> None:
    """A bad config key gives code 7 with the key and the offending value in the message."""
    err = _rejected(cni_env("ADD"), net_conf(**{key: value}))
    assert err.code == Code.INVALID_CONFIG
    assert key in err.msg
    assert repr(None if value is OMIT else value) in err.msg


@pytest.mark.parametrize("mtu", [0, 576, 1450, 9000, 65535])
def test_mtu_in_range_is_kept(mtu: int) -> None:
    """An MTU of 0 (agent default) or 576..65535 is passed on."""
    assert parse_request(cni_env("ADD"), net_conf(mtu=mtu)).mtu == mtu


def test_check_requires_prev_result() -> None:
    """CHECK without prevResult gives code 7 naming prevResult; with it the result is kept."""
    err = _rejected(cni_env("CHECK"), net_conf())
    assert err.code == Code.INVALID_CONFIG and "prevResult" in err.msg
    assert parse_request(cni_env("CHECK"), net_conf(prevResult=PREV_RESULT)).prev_result == PREV_RESULT


ATTACHMENTS = [{"containerID": "a", "ifname": "eth0"}, {"containerID": "b", "ifname": "net1"}]


@pytest.mark.parametrize("key", ["cni.dev/valid-attachments", "cni.dev/attachments"])
def test_gc_reads_attachments_under_either_key(key: str) -> None:
    """GC takes the runtime's attachments from the 1.1 key or the older draft's key."""
    request = parse_request(cni_env("GC"), net_conf(**{key: ATTACHMENTS}))
    assert request.valid_attachments == (Attachment("a", "eth0"), Attachment("b", "net1"))


def test_gc_prefers_valid_attachments_and_defaults_to_none() -> None:
    """With both keys the spec's `valid-attachments` wins; with neither, nothing is valid."""
    both = net_conf(**{"cni.dev/valid-attachments": ATTACHMENTS[:1], "cni.dev/attachments": ATTACHMENTS})
    assert parse_request(cni_env("GC"), both).valid_attachments == (Attachment("a", "eth0"),)
    assert parse_request(cni_env("GC"), net_conf()).valid_attachments == ()


def test_attachments_matter_to_gc_only() -> None:
    """Other commands ignore attachment lists, even malformed ones."""
    conf = net_conf(**{"cni.dev/valid-attachments": "junk"})
    assert parse_request(cni_env("DEL"), conf).valid_attachments == ()


@pytest.mark.parametrize(
    ("value", "where"),
    [
        ({"containerID": "a"}, "cni.dev/valid-attachments"),
        ([{"containerID": "a"}], "cni.dev/valid-attachments[0]"),
        ([{"containerID": "a", "ifname": 0}], "cni.dev/valid-attachments[0]"),
        ([ATTACHMENTS[0], "eth0"], "cni.dev/valid-attachments[1]"),
    ],
)
def test_bad_gc_attachments_are_named(value: Any, where: str) -> None:
    """A malformed attachment list gives code 7 naming the key and the index at fault."""
    err = _rejected(cni_env("GC"), net_conf(**{"cni.dev/valid-attachments": value}))
    assert err.code == Code.INVALID_CONFIG and where in err.msg


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(["ips", "address", "containerID", "ifname"]), inner, max_size=3)
    ),
    max_leaves=8,
)
CONF_KEYS = st.sampled_from(
    ["cniVersion", "name", "type", "mtu", "prevResult", "cni.dev/valid-attachments", "cni.dev/attachments"]
)


@settings(max_examples=200, deadline=None)
@given(
    command=st.sampled_from(["ADD", "CHECK", "DEL", "GC", "STATUS"]),
    changes=st.dictionaries(CONF_KEYS, JSON_VALUES, max_size=4),
)
def test_any_config_is_accepted_or_rejected_with_a_code(command: str, changes: dict[str, Any]) -> None:
    """Whatever JSON the config holds, parsing ends in a request or a CniError (code 1 or 7)."""
    try:
        parse_request(cni_env(command), net_conf(**changes))
    except CniError as err:
        assert err.code in (Code.INCOMPATIBLE_VERSION, Code.INVALID_CONFIG)


@settings(max_examples=200, deadline=None)
@given(prev=st.dictionaries(st.sampled_from(["ips", "interfaces"]), JSON_VALUES))
def test_any_prev_result_gives_an_address_or_code_7(prev: dict[str, Any]) -> None:
    """Whatever prevResult a CHECK carries, it yields an IPv4 address or code 7, never a crash."""
    try:
        assert isinstance(prev_result_address(prev), ipaddress.IPv4Interface)
    except CniError as err:
        assert err.code == Code.INVALID_CONFIG


@pytest.mark.parametrize(
    ("stdin", "version"),
    [
        (net_conf(cniVersion="0.3.1"), "0.3.1"),
        (net_conf(cniVersion="9.9.9"), "1.1.0"),
        (net_conf(cniVersion=None), "1.1.0"),
        (b"[]", "1.1.0"),
        (b"{", "1.1.0"),
        (b"[" * 100_000, "1.1.0"),
    ],
)
def test_error_version_follows_a_readable_config(stdin: bytes, version: str) -> None:
    """Errors use the config's cniVersion when it is supported, else 1.1.0."""
    assert error_version(stdin) == version


@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
def test_cni_error_json_uses_the_requested_version(version: str) -> None:
    """An error renders as the spec's object: cniVersion, code, msg, details."""
    err = CniError(Code.INVALID_CONFIG, 'bad "mtu"', "details\n")
    assert json.loads(err.to_json(version)) == {
        "cniVersion": version,
        "code": 7,
        "msg": 'bad "mtu"',
        "details": "details\n",
    }
    assert not err.temporary and CniError(Code.TRY_AGAIN_LATER, "busy").temporary


RESULT = AddResult(
    host=Interface("trl0123456789a", "aa:aa:aa:aa:aa:aa", mtu=1450),
    pod=Interface("eth0", "bb:bb:bb:bb:bb:bb", sandbox="/run/netns/pod", mtu=1450),
    address=ipaddress.IPv4Interface("10.244.0.7/32"),
    gateway=ipaddress.IPv4Address("169.254.1.1"),
    routes=(ipaddress.IPv4Network("0.0.0.0/0"),),
)


@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
def test_render_result_follows_each_versions_schema(version: str) -> None:
    """Host then pod interface (sandbox on the pod's only), ips pointing at the pod's index,
    `version` only before 1.0.0 and interface `mtu` only from 1.1.0."""
    out = render_result(RESULT, version)
    assert out["cniVersion"] == version
    host, pod = out["interfaces"]
    assert "sandbox" not in host and pod["sandbox"] == "/run/netns/pod"
    assert (host["name"], pod["name"], pod["mac"]) == ("trl0123456789a", "eth0", "bb:bb:bb:bb:bb:bb")
    (ip,) = out["ips"]
    assert out["interfaces"][ip["interface"]] is pod
    assert (ip["address"], ip["gateway"]) == ("10.244.0.7/32", "169.254.1.1")
    assert ("version" in ip) == version.startswith("0.")
    assert ip.get("version", "4") == "4"
    assert all(("mtu" in iface) == (version == "1.1.0") for iface in (host, pod))
    assert out["routes"] == [{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}]
    assert json.loads(json.dumps(out)) == out


@pytest.mark.parametrize(
    ("ips", "address"),
    [
        ([{"address": "10.244.0.7/32"}], "10.244.0.7/32"),
        ([{"address": "fd00::7/128"}, {"address": "10.0.0.1/32"}], "10.0.0.1/32"),
        (
            ["junk", {"address": "nonsense"}, {"address": True}, {"address": 5}, {"address": "10.0.0.2/24"}],
            "10.0.0.2/24",
        ),
    ],
)
def test_prev_result_address_is_the_first_ipv4(ips: list[Any], address: str) -> None:
    """CHECK compares against the first readable IPv4 address of prevResult."""
    assert prev_result_address({"ips": ips}) == ipaddress.IPv4Interface(address)


@pytest.mark.parametrize(
    "prev", [{}, {"ips": []}, {"ips": None}, {"ips": 5}, {"ips": [{"address": "fd00::1/128"}]}]
)
def test_prev_result_without_ipv4_is_invalid_config(prev: dict[str, Any]) -> None:
    """A prevResult with no IPv4 address (or no list of ips) gives code 7 naming prevResult.ips."""
    with pytest.raises(CniError) as info:
        prev_result_address(prev)
    assert info.value.code == Code.INVALID_CONFIG and "prevResult.ips" in info.value.msg
