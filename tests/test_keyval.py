# SPDX-License-Identifier: GPL-2.0-or-later
"""qsd.cli.keyval: QEMU's keyval syntax and its error texts.

Expected texts come from qemu-storage-daemon 7.2 (transcripts/cli-probes*.txt
and probes of the real daemon, e.g. ``qemu-storage-daemon --blockdev 'a=1,a.b=2'``).
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qsd.cli.keyval import is_help, parse
from qsd.qmp.errors import QMPError


@pytest.mark.parametrize("text, implied, tree", [
    ("", None, {}),
    ("driver=file,node-name=f0,filename=disk.img", None,
     {"driver": "file", "node-name": "f0", "filename": "disk.img"}),
    ("qcow2,node-name=q0,file.driver=file,file.filename=disk.qcow2", "driver",
     {"driver": "qcow2", "node-name": "q0", "file": {"driver": "file", "filename": "disk.qcow2"}}),
    ("driver=file,node-name=f,filename=a,,b.img", None, {"driver": "file", "node-name": "f", "filename": "a,b.img"}),
    ("a=,,,,", None, {"a": ",,"}),
    ("a=x,", None, {"a": "x"}),
    ("a=b=c", None, {"a": "b=c"}),
    ("node-name=n0,node-name=n1", None, {"node-name": "n1"}),
    ("quorum,children.0=a,children.1=b", "driver", {"driver": "quorum", "children": ["a", "b"]}),
    ("x.0.a=1,x.1=2,x.0.b=3", None, {"x": [{"a": "1", "b": "3"}, "2"]}),
    ("x.01=a,x.0=b", None, {"x": ["b", "a"]}),
    ("x.0=aa,x.00=bb", None, {"x": ["bb"]}),             # QDict order decides between equal indexes
    ("x.00=bb,x.0=aa", None, {"x": ["bb"]}),
    ("c0", "chardev", {"chardev": "c0"}),
    ("a.b", "driver", {"driver": "a.b"}),                 # implied value: no key syntax applies
    ("__com.redhat_x.y=1", None, {"__com.redhat_x": {"y": "1"}}),
    ("__a._b=1", None, {"__a._b": "1"}),
    ("x.__a.b_c.d=1", None, {"x": {"__a.b_c": {"d": "1"}}}),
    ("a_b=1,A=2,x.a-b=3", None, {"a_b": "1", "A": "2", "x": {"a-b": "3"}}),
    ("a" * 127 + "=1", None, {"a" * 127: "1"}),
])
def test_parse(text: str, implied: str | None, tree: dict) -> None:
    assert parse(text, implied) == tree


@pytest.mark.parametrize("text, implied, desc", [
    ("driver=file,node-name=f0,filename", None, "Expected '=' after parameter 'filename'"),
    ("driver=null-co,raw", "driver", "Expected '=' after parameter 'raw'"),
    ("x", None, "Expected '=' after parameter 'x'"),
    ("null-co,x.a=1,x.a", "driver", "Expected '=' after parameter 'x.a'"),
    ("null-co,x.1", "driver", "Expected '=' after parameter 'x.1'"),
    ("null-co,helpx", "driver", "Expected '=' after parameter 'helpx'"),
    ("?,x", "driver", "Expected '=' after parameter 'x'"),
    ("null-co,0=a", "driver", "Invalid parameter '0'"),
    ("null-co,a..b=1", "driver", "Invalid parameter 'a..b'"),
    ("null-co,a.=1", "driver", "Invalid parameter 'a.'"),
    ("null-co,.a=1", "driver", "Invalid parameter '.a'"),
    ("null-co,a b=1", "driver", "Invalid parameter 'a b'"),
    ("null-co,=1", "driver", "Invalid parameter ''"),
    ("null-co,,", "driver", "Invalid parameter ''"),
    ("null-co,,x,node-name=n", "driver", "Invalid parameter ''"),
    (",", "driver", "Invalid parameter ''"),
    ("null-co,_a=1", "driver", "Invalid parameter '_a'"),
    ("null-co,1a=1", "driver", "Invalid parameter '1a'"),
    ("null-co,x.__a=1", "driver", "Invalid parameter 'x.__a'"),
    ("null-co,x.0a=1", "driver", "Invalid parameter 'x.0a'"),
    ("null-co,x.-1=1", "driver", "Invalid parameter 'x.-1'"),
    ("null-co,x.+1=1", "driver", "Invalid parameter 'x.+1'"),
    ("null-co,x.a+b=1", "driver", "Invalid parameter 'x.a+b'"),
    ("null-co,x.\u00e9=1", "driver", "Invalid parameter 'x.\u00e9'"),
    ("null-co,x.1 =1", "driver", "Invalid parameter 'x.1 '"),
    ("null-co,x.=1", "driver", "Invalid parameter 'x.'"),
    ("a" * 128 + "=1", None, f"Parameter '{'a' * 128}' is too long"),
    ("a" * 128, None, f"Parameter '{'a' * 128}' is too long"),
    ("a" * 128 + ".b=1", None, f"Parameter fragment '{'a' * 128}' is too long"),
    ("b." + "a" * 128 + ".b=1", None, f"Parameter fragment '{'a' * 128}' is too long"),
    ("null-co,a=1,a.b=2", "driver", "Parameters 'a.*' used inconsistently"),
    ("null-co,a.b=2,a=1", "driver", "Parameters 'a.*' used inconsistently"),
    ("null-co,a.b=2,a.b.c=1", "driver", "Parameters 'a.b.*' used inconsistently"),
    ("null-co,x.0=1,x.1=2,x.1.a=3", "driver", "Parameters 'x.1.*' used inconsistently"),
    ("raw,file=a,file.driver=null-co", "driver", "Parameters 'file.*' used inconsistently"),
    ("null-co,x.0=a,x.b=b", "driver", "Parameters 'x.*' used inconsistently"),
    ("null-co,x.a.0=1,x.a.b=2,x.0=1", "driver", "Parameters 'x.a.*' used inconsistently"),
    ("null-co,x.1=a", "driver", "Parameter 'x.0' missing"),
    ("null-co,x.01=a", "driver", "Parameter 'x.0' missing"),
    ("null-co,x.0=a,x.2=b", "driver", "Parameter 'x.1' missing"),
    ("bitmaps.99999999999=a", None, "Parameter 'bitmaps.0' missing"),
    ("null-co,a.x.1=1,b.y.1=1", "driver", "Parameter 'a.x.0' missing"),
    ("null-co,b.y.1=1,a.x.1=1", "driver", "Parameter 'a.x.0' missing"),
    ("null-co,help", "driver", "Help is not available for this option"),
    ("help", "driver", "Help is not available for this option"),
    ("?", None, "Help is not available for this option"),
    ("a=1,help", None, "Help is not available for this option"),
    ("null-co,x.1=a,help", "driver", "Help is not available for this option"),
    ("help,a b=1", None, "Invalid parameter 'a b'"),
])
def test_parse_errors(text: str, implied: str | None, desc: str) -> None:
    with pytest.raises(QMPError) as exc:
        parse(text, implied)
    assert exc.value.desc == desc
    assert exc.value.error_class == "GenericError"


def test_help() -> None:
    assert is_help("help", "qom-type")
    assert is_help("secret,help", "qom-type")
    assert is_help("help,id=x", "qom-type")
    assert is_help("secret,?", "qom-type")
    assert not is_help("secret,id=s0", "qom-type")
    assert not is_help("helpx", "qom-type")
    assert not is_help("secret,help=1", "qom-type")
    assert parse("help", "qom-type", allow_help=True) == {}
    assert parse("secret,help", "qom-type", allow_help=True) == {"qom-type": "secret"}


# ---------------------------------------------------------------------------------------------
# properties

_FIRST = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_KEY = st.builds(lambda a, b: a + b, st.sampled_from(_FIRST),
                 st.text(alphabet=_FIRST + "0123456789-_", max_size=8))
_VALUE = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)
_TREE = st.recursive(
    _VALUE,
    lambda children: st.one_of(
        st.dictionaries(_KEY, children, min_size=1, max_size=4),
        st.lists(children, min_size=1, max_size=4)),
    max_leaves=20)


def _serialise(tree: dict) -> str:
    """The keyval text for a tree (values escaped, lists as numeric keys)."""
    items: list[str] = []

    def walk(node: object, key: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{key}.{k}" if key else k)
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{key}.{i}")
        else:
            assert isinstance(node, str)
            items.append(f"{key}={node.replace(',', ',,')}")

    walk(tree, "")
    return ",".join(items)


@settings(max_examples=120, deadline=None)
@given(st.dictionaries(_KEY, _TREE, max_size=5))
def test_roundtrip(tree: dict) -> None:
    assert parse(_serialise(tree)) == tree


@settings(max_examples=50, deadline=None)
@given(st.dictionaries(_KEY, _TREE, min_size=1, max_size=4), st.text(alphabet=_FIRST, min_size=1, max_size=6))
def test_roundtrip_implied_key(tree: dict, implied_value: str) -> None:
    tree.pop("driver", None)
    text = implied_value + ("," + _serialise(tree) if tree else "")
    assert parse(text, "driver") == {"driver": implied_value, **tree}


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(_KEY, _VALUE, min_size=1, max_size=4), st.dictionaries(_KEY, _VALUE, min_size=1, max_size=4))
def test_last_repeated_key_wins(first: dict, second: dict) -> None:
    assert parse(_serialise(first) + "," + _serialise(second)) == {**first, **second}


_ALPHABET = st.sampled_from(list("ab01.,=_-?hpel x\u00e9") + ["help", "__", ",,", ".0", ".1"])


@settings(max_examples=400, deadline=None)
@given(st.lists(_ALPHABET, max_size=30).map("".join), st.sampled_from([None, "driver"]), st.booleans())
def test_arbitrary_text_only_raises_qmperror(text: str, implied: str | None, allow_help: bool) -> None:
    try:
        tree = parse(text, implied, allow_help=allow_help)
    except QMPError as exc:
        assert exc.desc
    else:
        assert isinstance(tree, dict)
        is_help(text, implied)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40), st.sampled_from([None, "driver"]))
def test_arbitrary_unicode_only_raises_qmperror(text: str, implied: str | None) -> None:
    try:
        parse(text, implied)
    except QMPError:
        pass
