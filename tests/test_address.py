"""Envelope address preparation: Django-compatible parsing, IDNA, SMTPUTF8, injection."""

from __future__ import annotations

import unicodedata

import idna
import pytest
from hypothesis import given
from hypothesis import strategies as st

from django_socketmail.smtp.address import EnvelopeAddress, idna_encode_domain, prepare_address
from django_socketmail.smtp.errors import InvalidAddressError


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("a@example.com", EnvelopeAddress("a@example.com")),
        ("Name <a@example.com>", EnvelopeAddress("a@example.com")),
        ('"Last, First" <a.b+tag@example.com>', EnvelopeAddress("a.b+tag@example.com")),
        ("a@bücher.example", EnvelopeAddress("a@xn--bcher-kva.example")),
        ("jörg@example.com", EnvelopeAddress("jörg@example.com", needs_smtputf8=True)),
        ("webmaster", EnvelopeAddress("webmaster")),
        ('"john doe"@example.com', EnvelopeAddress('"john doe"@example.com')),
    ],
)
def test_prepared(given: str, expected: EnvelopeAddress) -> None:
    assert prepare_address(given) == expected


@pytest.mark.parametrize(
    "bad",
    [
        "a@example.com\r\nRCPT TO:<evil@example.com>",
        "a@example.com\nDATA",
        "a\x00@example.com",
        "a@example.com, b@example.com",
        "<a@example.com",
        "a@" + "x" * 300 + ".com",
    ],
)
def test_refused_before_anything_is_sent(bad: str) -> None:
    with pytest.raises(InvalidAddressError) as info:
        prepare_address(bad)
    assert isinstance(info.value, ValueError)


# -- IDNA 2008 (RFC 5891, 5892, 5893) with the UTS #46 mapping, not Python's IDNA 2003 ------

IDNA_VECTORS = [
    ("fa\u00df.example", "xn--fa-hia.example"),  # IDNA 2003 says fass.example: another domain
    ("b\u00fccher.example", "xn--bcher-kva.example"),
    ("B\u00dcCHER.Example", "xn--bcher-kva.Example"),  # mapped to lower case; ASCII labels kept
    ("stra\u00dfe.de", "xn--strae-oqa.de"),
    (
        "\u03c0\u03b1\u03c1\u03ac\u03b4\u03b5\u03b9\u03b3\u03bc\u03b1.\u03b4\u03bf\u03ba\u03b9\u03bc\u03ae",
        "xn--hxajbheg2az3al.xn--jxalpdlp",
    ),
    ("\u039f\u0394\u039f\u03a3.gr", "xn--pxavbq.gr"),  # capital sigma maps to sigma
    ("\u03bf\u03b4\u03bf\u03c2.gr", "xn--pxavbm.gr"),  # final sigma is kept (IDNA 2008)
    ("\u043f\u0440\u0438\u043c\u0435\u0440.\u0440\u0444", "xn--e1afmkfd.xn--p1ai"),
    ("\u4f8b\u5b50.\u6d4b\u8bd5", "xn--fsqu00a.xn--0zwm56d"),
    ("\u30c9\u30e1\u30a4\u30f3.jp", "xn--eckwd4c7c.jp"),
    ("\ub3c4\uba54\uc778.kr", "xn--hq1bm8jm9l.kr"),
    ("ma\u00f1ana.com", "xn--maana-pta.com"),
    ("\uff2d\uff21\uff2e\uff21.example", "mana.example"),  # full-width letters: NFKC, then lower
    ("\u0645\u062b\u0627\u0644.example", "xn--mgbh0fb.example"),  # right-to-left
    ("\u05d1\u05d3\u05d9\u05e7\u05d4.example", "xn--5dbedt4e.example"),
    ("abc\u0431\u0432\u0433.example", "xn--abc-dddfg.example"),  # mixed scripts are allowed
    ("l\u00b7l.example", "xn--ll-0ea.example"),  # MIDDLE DOT between two l (RFC 5892 A.3)
    ("\u0915\u094d\u200d\u0937.example", "xn--11b2ezcw70k.example"),  # ZWJ after a virama
    ("\u0628\u0661\u0662\u0663.example", "xn--ngb8ide.example"),  # Arabic-Indic digits, one kind
]


@pytest.mark.parametrize(("domain", "expected"), IDNA_VECTORS)
def test_idna_2008_domains(domain: str, expected: str) -> None:
    assert prepare_address(f"user@{domain}") == EnvelopeAddress(f"user@{expected}")


def test_ascii_domains_pass_through_unchanged() -> None:
    assert prepare_address("User@Mail.Example.COM").addr_spec == "User@Mail.Example.COM"
    assert prepare_address("a@xn--bcher-kva.example").addr_spec == "a@xn--bcher-kva.example"


IDNA_REFUSED = [
    ("\u00fc" * 60 + ".example", "63"),  # the A-label is longer than 63 octets
    ("\U0001f4a9.example", "U+1F4A9"),  # emoji: DISALLOWED
    ("\u2764.example", "U+2764"),
    ("a\u200bb.example", "U+200B"),  # zero width space: DISALLOWED
    ("b\u00fccher\u00ad.example", "U+00AD"),  # soft hyphen: DISALLOWED (UTS #46 ignores it)
    ("\u1e9e.example", "U+1E9E"),  # capital sharp s: UTS #46 versions disagree on its mapping
    ("a\u200cb.example", "U+200C"),  # ZWNJ needs joining types the standard library lacks
    ("a\u200db.example", "U+200D"),  # ZWJ not after a virama
    ("\u0301b\u00fccher.example", "combining mark"),
    ("-b\u00fccher.example", "hyphen"),
    ("b\u00fccher-.example", "hyphen"),
    ("b\u00fc--cher.example", "hyphen"),
    ("a\u00b7b.example", "U+00B7"),  # MIDDLE DOT not between two l
    ("\u0628\u0661\u06f1.example", "RFC 5892 Appendix A"),  # two kinds of Arabic digits
    ("\u0645\u062b\u0627\u0644a.example", "bidi"),  # right-to-left label ending in L
    ("\u0645\u062b\u0627\u0644.1example", "bidi"),  # bidi domain name: a label starts with EN
    ("b\u00fccher_shop.example", "U+005F"),
    ("b\u00fccher\u3002example", "U+3002"),  # ideographic full stop: not a separator here
    ("\U000e0100\u00e4.example", "U+E0100"),
    ("\u0378\u00e4.example", "unassigned"),
]


@pytest.mark.parametrize(("domain", "reason"), IDNA_REFUSED)
def test_idna_2008_refusals_name_the_domain(domain: str, reason: str) -> None:
    with pytest.raises(InvalidAddressError) as info:
        prepare_address(f"user@{domain}")
    message = str(info.value)
    assert repr(domain) in message or domain in message, message
    assert reason in message, message


@pytest.mark.parametrize("domain", ["b\u00fccher..example", ".b\u00fccher", "b\u00fccher."])
def test_empty_labels_are_refused(domain: str) -> None:
    with pytest.raises(ValueError, match="empty label"):
        idna_encode_domain(domain)


def test_a_domain_over_253_octets_is_refused() -> None:
    domain = ".".join(["b\u00fccher"] * 15 + ["x" * 60])
    with pytest.raises(ValueError, match="253 at most"):
        idna_encode_domain(domain)


@pytest.mark.parametrize(
    "bad", ["a\x85b@example.com", "a\u2028@example.com", "a\u202e@example.com"]
)
def test_line_separators_and_overrides_never_reach_the_envelope(bad: str) -> None:
    with pytest.raises(InvalidAddressError, match="control character"):
        prepare_address(bad)


# -- compared with the `idna` package (IDNA 2008 + UTS #46, in the `test` extra) -----------


def reference(domain: str) -> str | None:
    try:
        return str(idna.encode(domain, uts46=True, transitional=False).decode("ascii"))
    except idna.IDNAError:
        return None


@pytest.mark.parametrize(("domain", "expected"), IDNA_VECTORS)
def test_vectors_agree_with_the_idna_package(domain: str, expected: str) -> None:
    # The package lower-cases ASCII labels too; we keep them as given, like ASCII domains.
    assert reference(domain) == expected.lower()


def test_derived_property_agrees_with_the_idna_package_for_every_code_point() -> None:
    """RFC 5892 §3 computed from `unicodedata` equals the package's table, where both know
    the code point (the package may follow a newer Unicode than this Python)."""
    from idna.idnadata import codepoint_classes
    from idna.intranges import intranges_contain

    from django_socketmail.smtp.address import derived_property

    differences = []
    for cp in range(0x110000):
        ours = derived_property(chr(cp))
        if ours in ("UNASSIGNED", "DISALLOWED") and unicodedata.category(chr(cp)) == "Cn":
            continue
        theirs = next(
            (name for name, ranges in codepoint_classes.items() if intranges_contain(cp, ranges)),
            "DISALLOWED",
        )
        if ours != theirs:
            differences.append(f"U+{cp:04X} ours={ours} idna={theirs}")
    assert differences == []


_INTERESTING = (
    "abcz09-AZ\u00df\u00fc\u00dc\u03c2\u03c3\u03a3\u0130\u0131\u1e9e\u00b7l\u0375\u03b1"
    "\u05d0\u05f3\u0627\u0661\u06f1\u0915\u094d\u200c\u200d\u30fb\u30a2\u3042\u4e00"
    "\uff21\u2460\ufb01\u00ad\u0301\u0300\U0001f600\u3002_"
)


@given(st.lists(st.text(alphabet=_INTERESTING, min_size=1, max_size=6), min_size=1, max_size=3))
def test_whatever_we_accept_the_idna_package_encodes_the_same(labels: list[str]) -> None:
    domain = ".".join(labels) + ".example"
    if domain.isascii():
        return
    try:
        ours = prepare_address(f"user@{domain}").addr_spec.partition("@")[2]
    except InvalidAddressError:
        return  # refusing is allowed: we refuse what we cannot map with certainty
    assert ours.lower() == reference(domain)


def test_script_guesses_from_names_never_claim_a_wrong_script() -> None:
    """The CONTEXTO rules (RFC 5892 A.4, A.5, A.7) need a Script property the standard
    library lacks; the names stand in for it.  A miss only refuses a label; a wrong claim
    would accept one: for every code point a valid label can hold, the guess implies the
    script in the `idna` package's data."""
    from idna.idnadata import scripts
    from idna.intranges import intranges_contain

    from django_socketmail.smtp import address

    def script(cp: int, *names: str) -> bool:
        return any(intranges_contain(cp, scripts[name]) for name in names)

    wrong = []
    for cp in range(0x110000):
        char = chr(cp)
        if address.derived_property(char) not in ("PVALID", "CONTEXTO"):
            continue
        name = unicodedata.name(char, "")
        if address._japanese(char) and not script(cp, "Hiragana", "Katakana", "Han"):
            wrong.append(f"U+{cp:04X} Japanese")
        if name.startswith("GREEK ") and cp != 0x0375 and not script(cp, "Greek"):
            wrong.append(f"U+{cp:04X} Greek")
        if name.startswith("HEBREW ") and not script(cp, "Hebrew"):
            wrong.append(f"U+{cp:04X} Hebrew")
    assert wrong == []


@pytest.mark.parametrize(
    ("domain", "ok"),
    [
        ("\u0375\u03b1.example", True),  # the keraia must be followed by Greek
        ("\u0375.example", False),
        ("\u03b1\u0375\u03b2.example", True),
        ("\u03b1\u0375b.example", False),
        ("\u05d0\u05f3.example", True),
        ("a\u05f3\u00e4.example", False),
        ("\u30a2\u30fb\u30a2.example", True),
        ("\u00e4\u30fb\u00e4.example", False),
    ],
)
def test_contexto_rules(domain: str, ok: bool) -> None:
    if ok:
        assert idna_encode_domain(domain) == reference(domain)
    else:
        with pytest.raises(ValueError, match="RFC 5892 Appendix A"):
            idna_encode_domain(domain)
        assert reference(domain) is None
