"""Mask personal data in free text before it is stored, exported or turned into training data.

>>> redact("I'm jane.doe@example.com, call me on +44 20 7946 0958")
"I'm [email], call me on [phone]"
>>> redact("card 4111 1111 1111 1111, refund to DE89 3704 0044 0532 0130 00")
'card [card], refund to [iban]'
>>> redact("Order #100234 of 2026-11-23 cost $1,299.99, delivery 8am-8pm to 90210")
'Order #100234 of 2026-11-23 cost $1,299.99, delivery 8am-8pm to 90210'

What is masked, in this order (each pass sees the previous pass's placeholders, never the raw text):

``[email]``
    ``local@domain.tld``.
``[iban]``
    two letters, two check digits, then 11–30 letters/digits in one block or in groups of four; only
    when the ISO 13616 mod-97 check passes and the account part has at least 8 digits, so words like
    ``AB12 …`` stay.
``[card]``
    13–19 digits, Luhn-valid, in one block or grouped as cards are printed (4-4-4-4, 4-4-4-4-3,
    American Express 4-6-5, Diners 4-6-4) with single spaces or dashes. A run with extra digits
    around it (``4111 1111 1111 1111 123``) still has its card part masked. A 13–19 digit order
    number that happens to pass Luhn (1 in 10) is masked too: the price of never storing a card.
``[phone]``
    7–15 digits that *look like a phone number*. Digit counts alone cannot tell a phone from an order
    number, a date or a price, so the rule is about shape:

    * it starts with ``+`` (``+1 (555) 123-4567``, ``+49 30 1234567``) or has a parenthesised area
      code (``(555) 123-4567``);
    * or it has 9–15 digits in several groups separated by spaces, dashes or dots
      (``555-123-4567``, ``1-800-555-0199``, ``020 7946 0958``, ``912 345 678``); two groups only with
      a leading ``0`` trunk prefix (``030 1234567``), groups of two digits only with a leading ``0``
      (``06 12 34 56 78``, not the shoe sizes ``36 38 40 42 44``);
    * or it is one unbroken run with a trunk prefix: ``0`` + 9–10 digits (``0612345678``) or ``00`` +
      7–13 digits;
    * or a phone word (``phone``, ``tel``, ``call``, ``mobile``, ``cell``, ``whatsapp``, ``sms``, ``fax``…)
      comes just before it, which admits any 7–15 digit shape (``my cell is 5551234567``, ``555-1234``).

    Never a phone: anything right after ``#``, a currency sign, ``/``, ``=`` or a letter (order
    numbers ``#100234``, prices, URLs, query strings, SKUs); dates (``2026-11-23``, ``23.11.2026``);
    ZIP+4 codes (``90210-1234``); thousands-grouped amounts (``1 299 000``); dotted IPv4 addresses.
    A phone glued to another number (``100234 555 123 4567``, ``555 123 4567 2 times``) is found
    inside the run. Known misses, by design: an order number written exactly like a phone
    (``100-234-5678``) is masked; a bare 10-digit US number with no phone word before it
    (``5551234567``) is kept.

Worst-case time is linear in the length of the text (about a second per 100 kB of adversarial
digits, microseconds for a chat message); callers should still cap message length.

``keep`` lists strings that are never masked, compared ignoring case and punctuation: the business's
own support address and hotline, which appear in answers and must survive into training data.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["redact"]

EMAIL = "[email]"
PHONE = "[phone]"
CARD = "[card]"
IBAN = "[iban]"

_LOCAL = r"[\w.!#$%&'*+/=?^`{|}~-]"
_LABEL = r"[^\W_](?:[\w-]*[^\W_])?"  # a domain label: letters, digits, inner dashes
# The lookbehind lets a local part start only once per run: without it a long run of word characters
# with no "@" would be rescanned from every position (quadratic time).
_EMAIL_RE = re.compile(rf"(?<!{_LOCAL}){_LOCAL}+@{_LABEL}(?:\.{_LABEL})*\.[^\W\d_]{{2,}}")

# Written in one block or in groups of four, as banks print them. A grouped match may swallow a
# following four-letter word ("… 0130 00 from"); the callback drops trailing groups until the
# checksum passes.
_IBAN_RE = re.compile(
    r"(?<!\w)[A-Za-z]{2}\d{2}(?:[A-Za-z0-9]{11,30}|(?: [A-Za-z0-9]{4}){2,7}(?: [A-Za-z0-9]{1,4})?)(?!\w)"
)

_CARD_RE = re.compile(r"(?<![\w#$€£¥/.,-])\d(?:[ -]?\d){12,}(?!\w)")

_PHONE_RE = re.compile(r"(?<![\w#$€£¥%/.,=+-])(?:\+|\(\+?)?\d(?:[\d ().-]*\d)?(?![\w%]|[.,]\d)")
_PHONE_WORD_RE = re.compile(
    r"\b(?:phone|telephone|tel|mobile|cell|cellphone|call|ring|whatsapp|sms|text me|fax|reach me)\b",
    re.IGNORECASE,
)
_DATE_RE = re.compile(r"(?<!\d)(?:\d{4}[-./]\d{1,2}[-./]\d{1,2}|\d{1,2}[-./]\d{1,2}[-./]\d{4})(?!\d)")
_ZIP4_RE = re.compile(r"\d{5}-\d{4}")
_THOUSANDS_RE = re.compile(r"\d{1,2}(?:[ .]\d{3})+")
_IPV4_RE = re.compile(r"\d{1,3}(?:\.\d{1,3}){3}")
_BARE_TRUNK_RE = re.compile(r"0[1-9]\d{8,9}|00[1-9]\d{6,12}")
_DIGITS_RE = re.compile(r"\d+")
_MAX_PHONE_GROUPS = 8


def _key(text: str) -> str:
    return re.sub(r"[^0-9a-z@]", "", text.casefold())


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _iban_valid(compact: str) -> bool:
    """ISO 13616: 15–34 characters, mod 97 of the rearranged number is 1; we also want a mostly
    numeric account part (every national format has at least 8 digits), which keeps the 1-in-97
    chance hits of ordinary words out."""
    if not 15 <= len(compact) <= 34 or sum(ch.isdigit() for ch in compact[4:]) < 8:
        return False
    rearranged = (compact[4:] + compact[:4]).upper()
    return int("".join(str(int(ch, 36)) for ch in rearranged)) % 97 == 1


def _is_phone(candidate: str, before: str) -> bool:
    """Whether ``candidate`` (digits and separators) has a phone's shape; ``before``: the text before it."""
    groups = _DIGITS_RE.findall(candidate)
    digits = "".join(groups)
    if not 7 <= len(digits) <= 15:
        return False
    if not (candidate.startswith("+") or "(" in candidate):
        if any(len(g) < 2 for g in groups[1:]):
            return False  # "555 123 4567 2 times": the 2 is not part of the number
        if not _PHONE_WORD_RE.search(before) and not _national_shape(candidate, groups, digits):
            return False
    return not (_DATE_RE.search(candidate) or _IPV4_RE.fullmatch(candidate))


def _national_shape(candidate: str, groups: list[str], digits: str) -> bool:
    """A phone written without ``+``, area-code parentheses or a phone word before it."""
    if len(groups) == 1:
        return bool(_BARE_TRUNK_RE.fullmatch(digits))
    if len(digits) < 9 or _ZIP4_RE.fullmatch(candidate) or _THOUSANDS_RE.fullmatch(candidate):
        return False
    if len(groups) == 2 or all(len(g) == 2 for g in groups):
        return digits.startswith("0")  # 030 1234567, 06 12 34 56 78; not 1000 2000, not 36 38 40 42
    return True


def _card_grouping(groups: list[str]) -> bool:
    """Grouped the way cards are printed: one block, 4-4-4-4(-3), or American Express 4-6-5 / Diners 4-6-4."""
    sizes = [len(g) for g in groups]
    if len(sizes) == 1 or sizes in ([4, 6, 5], [4, 6, 4]):
        return True
    return all(n == 4 for n in sizes[:-1]) and 1 <= sizes[-1] <= 4


def _mask_cards(run: str, kept: set[str]) -> str:
    """Mask the card numbers in one run of digit groups; a card may be only part of the run."""
    spans = [g.span() for g in _DIGITS_RE.finditer(run)]
    out: list[str] = []
    pos = i = 0
    while i < len(spans):
        for j in range(min(len(spans), i + 5) - 1, i - 1, -1):  # a printed card has at most 5 groups
            groups = [run[a:b] for a, b in spans[i : j + 1]]
            digits = "".join(groups)
            if 13 <= len(digits) <= 19 and _card_grouping(groups) and _luhn(digits) and _key(digits) not in kept:
                out += [run[pos : spans[i][0]], CARD]
                pos, i = spans[j][1], j + 1
                break
        else:
            i += 1
    return "".join(out) + run[pos:]


def _mask_phones(run: str, before: str, kept: set[str]) -> str:
    """Mask the phone numbers in one candidate run of digits and separators.

    A run can glue a phone to a neighbouring number (``100234 555 123 4567``, ``555 123 4567 2 times``,
    two phones in a row), so when the whole run is not phone-shaped, its sub-runs split at spaces are
    tried, the one ending rightmost first: first the shortest with a phone shape of its own, then the
    longest that a phone word before it admits. What is left before it is searched again. Linear in
    the length of the run (sub-runs have at most ``_MAX_PHONE_GROUPS`` groups), whatever it holds.
    """
    spans = [g.span() for g in _DIGITS_RE.finditer(run)]
    digits_upto, short_upto = [0], [0]  # prefix sums: digits, and one-digit groups, before group k
    for a, b in spans:
        digits_upto.append(digits_upto[-1] + b - a)
        short_upto.append(short_upto[-1] + (b - a < 2))

    def subrun(n: int, word_admits: bool) -> tuple[int, int, int] | None:
        """(first group, start, end) of the phone among spans[:n] that ends rightmost, if any."""
        for j in range(n - 1, -1, -1):
            sizes = range(1, min(j + 1, _MAX_PHONE_GROUPS) + 1)
            for size in reversed(sizes) if word_admits else sizes:
                i = j - size + 1
                start, end = spans[i][0], spans[j][1]
                while start > 0 and run[start - 1] in "+(":
                    start -= 1
                if word_admits and start >= 30:
                    break  # the run holds no words: a phone word can only be in `before`
                if (start and run[start - 1] != " ") or (end < len(run) and run[end] != " "):
                    continue  # split only between words: never inside a date, an IP, an amount
                # cheap early exits, the same rules as in _is_phone
                if not 7 <= digits_upto[j + 1] - digits_upto[i] <= 15:
                    continue
                if run[start] not in "+(" and short_upto[j + 1] - short_upto[i + 1]:
                    continue
                piece = run[start:end]
                context = (before + run[:start])[-30:] if word_admits else ""
                if _is_phone(piece, context) and _key(piece) not in kept:
                    return i, start, end
        return None

    out: list[str] = []  # masked pieces, right to left
    limit, n = len(run), len(spans)  # still to search: run[:limit], holding spans[:n]
    while n:
        if digits_upto[n] <= 15 and _is_phone(run[:limit], before[-30:]):
            if _key(run[:limit]) not in kept:
                out.append(_phone_placeholder(run[:limit]))
                limit = 0
            break
        hit = subrun(n, word_admits=False) or subrun(n, word_admits=True)
        if hit is None:
            break
        i, start, end = hit
        core_end = start
        while core_end and run[core_end - 1] == " ":
            core_end -= 1
        out += [run[end:limit], _phone_placeholder(run[start:end]), run[core_end:start]]
        limit, n = core_end, i
    return run[:limit] + "".join(reversed(out))


def _phone_placeholder(piece: str) -> str:
    if piece.startswith("(") and ")" not in piece:
        return "(" + PHONE  # the sentence's opening parenthesis, not an area code
    return PHONE


def redact(text: str, *, keep: Iterable[str] = ()) -> str:
    """``text`` with e-mail addresses, IBANs, card numbers and phone numbers replaced by placeholders.

    See the module docstring for the exact rules. ``keep``: strings never masked (your own contacts).
    """
    if not text:
        return text
    kept = {_key(k) for k in keep}

    def email(m: re.Match[str]) -> str:
        return m[0] if _key(m[0]) in kept else EMAIL

    def iban(m: re.Match[str]) -> str:
        tokens = m[0].split(" ")
        for end in range(len(tokens), 0, -1):
            compact = "".join(tokens[:end])
            if _iban_valid(compact):
                if _key(compact) in kept:
                    return m[0]
                rest = " ".join(tokens[end:])
                return IBAN + (" " + rest if rest else "")
        return m[0]

    def card(m: re.Match[str]) -> str:
        return _mask_cards(m[0], kept)

    def phone(m: re.Match[str]) -> str:
        return _mask_phones(m[0], m.string[max(0, m.start() - 30) : m.start()], kept)

    text = _EMAIL_RE.sub(email, text)
    text = _IBAN_RE.sub(iban, text)
    text = _CARD_RE.sub(card, text)
    return _PHONE_RE.sub(phone, text)
