"""Which sections ``python -m bench`` runs: ``make bench`` stays quick, the long ones are
asked for."""

from __future__ import annotations

from bench.__main__ import LONG, QUICK, SECTIONS, selected


def test_every_section_is_quick_or_long():
    assert sorted((*QUICK, *LONG)) == sorted(SECTIONS)
    assert not set(QUICK) & set(LONG)


def test_the_default_leaves_the_long_sections_out():
    assert selected(None, long=False) == [name for name in SECTIONS if name in QUICK]
    assert not {"scale", "bookkeeping", "datapath"} & set(selected(None, long=False))


def test_long_adds_them_and_only_names_any():
    assert selected(None, long=True) == list(SECTIONS)
    assert selected(["scale"], long=False) == ["scale"]
    assert selected(["bookkeeping", "core"], long=False) == ["core", "bookkeeping"]
