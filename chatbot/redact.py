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
    (``100-234-5678``) is masked unless an order word comes before it.

Added for issue 16 (what customers actually type; measured on ``tests/data/redaction.jsonl`` by
``python -m benchmarks.robustness --only redaction``):

``[email]`` (spelled out)
    ``jane dot doe at example dot com``, ``jane.doe [at] example [dot] com``, ``bob(at)x(dot)org``,
    ``kim @ example.net``; a plain ``at`` with a plain dotted domain only when the local part is
    dotted or the domain is a mail provider (``alice at gmail.com``, not ``look at example.com``).
``[password]``, ``[pin]``, ``[code]``, ``[cvv]``, ``[expiry]``, ``[dob]``
    the value after its keyword, with ``is``, ``was``, ``:``, ``=``, ``-`` between or nothing:
    ``password``/``passwd``/``pwd``/``pw``/``passphrase`` (a plain word about the password is
    kept: ``password is wrong``, ``password reset``, ``password policy?``); ``PIN``/``passcode``
    + 4-8 digits; ``OTP``, ``one-time code``, ``verification code``, ``2FA code``, ``code`` (not
    after postal/zip/promo/discount/coupon/voucher/gift/error/area) + 4-8 digits or a 6-8
    character code with a digit; ``CVV``/``CVC``/``CSC``/``security code``/``code on the back`` +
    3-4 digits; ``exp``/``expiry``/``expiration date``/``valid thru`` + MM/YY; ``DOB``, ``date of
    birth``, ``birthday``, ``born (on|in)`` + a date in any common form or a year.
    After a masked card, an MM/YY and a 3-4 digit number follow as ``[expiry]`` and ``[cvv]``
    (``[card] 12/27 123``), whatever words (exp, cvv) stand between. ``expires 12/25`` alone is
    kept: coupons expire too.
``[national-id]``
    US SSN ``123-45-6789`` / ``123 45 6789`` (area not 000, 666 or 9xx; after ``SSN`` or ``social
    security`` also 9 digits in a row); UK National Insurance ``AB 12 34 56 C`` (valid prefixes
    only, not after a model/SKU/part word); Chinese resident id (18 characters with its birth date
    and the GB 11643 check digit).
``[ip]``
    IPv4 with every part 0-255 (not after ``version``/``v``/``build``/``release``/``firmware``),
    IPv6 (full or ``::`` form, checked by :mod:`ipaddress`).
``[card]`` with dots
    ``4111.1111.1111.1111`` like the space and dash groupings.
``[phone]`` bare national numbers
    a US number of 10 digits (11 with the leading 1; area and exchange starting 2-9) or a Chinese
    mobile (``1[3-9]`` + 9 digits) written as one run, unless an order, invoice, tracking,
    account, ticket, SKU, part, model or serial word comes just before it; the tail of a tracking
    number printed in groups (``tracking: 1Z 999 AA1 01 2345 6784``) is no phone either.

Names and street addresses are not masked: that needs a named-entity model, and none installs
offline here (spaCy's English models are not on PyPI; the only mirror there is for spaCy 2).

Worst-case time is linear in the length of the text (about a second per 100 kB of adversarial
digits, microseconds for a chat message); callers should still cap message length.

``keep`` lists strings that are never masked, compared ignoring case and punctuation: the business's
own support address and hotline, which appear in answers and must survive into training data.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable

__all__ = ["redact"]

EMAIL = "[email]"
PHONE = "[phone]"
CARD = "[card]"
IBAN = "[iban]"
CVV = "[cvv]"
EXPIRY = "[expiry]"
PASSWORD = "[password]"
PIN = "[pin]"
CODE = "[code]"
NATIONAL_ID = "[national-id]"
DOB = "[dob]"
IP = "[ip]"

# -- obfuscated e-mail: "jane dot doe at example dot com", "jane.doe [at] example [dot] com" ---------
_TLDS = (
    "com|net|org|edu|gov|mil|int|info|biz|io|co|me|app|dev|uk|us|ca|au|nz|ie|de|fr|es|it|nl|be|ch|at|se|no|dk|fi|"
    "pl|pt|cz|ru|ua|cn|jp|kr|tw|hk|sg|in|br|mx|ar|za|eu"
)
_BRACKETED = r"\s*[\[\(\{{<]\s*{word}\s*[\]\)\}}>]\s*"
_OBF_AT = r"(?:" + _BRACKETED.format(word="at") + r"|\s+at\s+|\s*@\s*)"
_OBF_DOT = r"(?:" + _BRACKETED.format(word="dot") + r"|\s+dot\s+|\.)"
_OBF_EMAIL_RE = re.compile(
    # Bounded repeats and a start only where a local part can begin keep this linear on long runs.
    rf"(?<![\w.@+-])[a-z0-9_+-]{{1,64}}(?:{_OBF_DOT}[a-z0-9_+-]{{1,64}}){{0,4}}{_OBF_AT}"
    rf"[a-z0-9-]{{1,63}}(?:{_OBF_DOT}[a-z0-9-]{{1,63}}){{0,4}}?"
    rf"{_OBF_DOT}(?:{_TLDS})(?![\w@])",
    re.IGNORECASE,
)
_PLAIN_AT_RE = re.compile(r"\s+at\s+", re.IGNORECASE)
_PROVIDERS_TEXT = (
    "gmail googlemail yahoo hotmail outlook live msn aol icloud me mac proton protonmail gmx web qq 163 126"
)
_MAIL_PROVIDERS = frozenset([*_PROVIDERS_TEXT.split(), "yandex", "mail", "zoho", "fastmail"])

# -- secrets after their keyword ---------------------------------------------------------------------
_SEP = r"(?P<sep>\s*(?:(?:is|was|=|:|->|-)\s*)*)"
_PASSWORD_RE = re.compile(
    rf"\b(?:pass(?:word|wd|phrase)|pwd|pw|login password|pass(?=\s*(?:is|was|:|=)\s))\b"
    # "password for my bank is X", "password to my account: X", "changed my password to X"
    rf"(?:\s+(?:for|on)\s+(?:my\s+|the\s+)?\S+|\s+to\s+(?:my|the|your)\s+\S+)?(?:(?P<to>\s+to\s+)|{_SEP})"
    r"(?P<value>\"[^\"\n]{1,64}\"|'[^'\n]{1,64}'|[^\s\"']{1,64})",
    re.IGNORECASE,
)
#: What follows "password is" when it is about the password, not the password itself.
_STATE_TEXT = """not wrong incorrect invalid expired too very still being correct right the a an my your our this that it
    case case-sensitive required reset changed locked blocked working accepted rejected saved lost forgotten weak
    strong short long same different missing empty ok okay fine compromised stolen hacked now also already in on at
    for to of and or but definitely probably there here what which where how why when sent stored mandatory set
    updated new old no yes protected encrypted hidden shown visible needed asked requested secure safe"""
_STATE_WORDS = frozenset(_STATE_TEXT.split())
_PIN_RE = re.compile(
    rf"\b(?:pin(?:\s*(?:code|number|no\.?))?|passcode)\b(?:\s+(?:for|to|on|of)\s+(?:my\s+|the\s+)?\S+)?{_SEP}"
    r"(?P<value>\d{4,8})(?!\d)",
    re.IGNORECASE,
)
_OTP_RE = re.compile(
    r"\b(?:otp|one[- ]time\s+(?:pass)?(?:code|password|pin)|verification\s+code|auth(?:entication)?\s+code|"
    r"2fa\s+code|sms\s+code|login\s+code|security\s+code|confirmation\s+code|access\s+code|"
    r"(?<!postal )(?<!zip )(?<!promo )(?<!discount )(?<!coupon )(?<!voucher )(?<!gift )(?<!error )(?<!area )code)\b"
    # "the code you texted: 123456": a few words may come between the name and a colon
    # digits only ("SUMMER10" is a promo code), possibly grouped: "84 21 99"
    rf"(?:(?:\s+[a-z]+){{1,3}}\s*:)?{_SEP}(?P<value>\d{{4,8}}|\d{{2,3}}(?:[ -]\d{{2,3}}){{1,3}})(?![\w-])",
    re.IGNORECASE,
)
_CVV_RE = re.compile(
    rf"\b(?:cvv2?|cvc2?|csc|cvn|security\s+code|card\s+code|card\s+verification(?:\s+(?:code|value))?|"
    rf"(?:3|three)[- ]digit\s+code(?:\s+on\s+the\s+back)?|code\s+on\s+the\s+back|"
    rf"(?:3|three|4|four)\s+digits\s+on\s+the\s+(?:back|front))\b{_SEP}(?P<value>\d{{3,4}})(?!\d)",
    re.IGNORECASE,
)
_MONTH_YEAR = r"(?:0?[1-9]|1[0-2])\s?[/-]\s?(?:20)?\d{2}(?![\d/-])"
_EXPIRY_RE = re.compile(
    rf"\b(?:exp(?:iry|iration)?(?:\s+date)?|valid\s+(?:thru|through|until)|good\s+thru)\b\.?"
    rf"{_SEP}(?P<value>{_MONTH_YEAR})",
    re.IGNORECASE,
)
# Right after a masked card: "[card] 12/27 123", "[card], exp 12/27, 123"
_AFTER_CARD_RE = re.compile(
    r"\[card\](?P<gap1>[ ,;]*(?:(?:exp(?:iry|ires)?|valid\s+thru)\.?:?\s*)?)(?P<exp>" + _MONTH_YEAR + r"|\[expiry\])?"
    r"(?P<gap2>[ ,;]*(?:(?:cvv2?|cvc2?|csc|(?:security\s+)?code)\.?:?\s*)?)(?P<cvv>(?<![\d/])\d{3,4}(?![\d/.,:]\d|\d|\s*(?:%|\$|€|£|usd|eur|gbp|dollars|euros|pounds|items|times|days)\b))?",
    re.IGNORECASE,
)

# -- national ids -----------------------------------------------------------------------------------
_SSN_RE = re.compile(r"(?<![\d-])(?!000|666|9\d\d)\d{3}([- ])(?!00)\d{2}\1(?!0000)\d{4}(?![\d-])")
_SSN_WORD_RE = re.compile(
    r"\b(?:ssn|social\s+security)\b(?:\s+(?:number|no\.?|#))?\s*(?:is|:|#)?\s*(?P<value>\d{3}[- ]?\d{2}[- ]?\d{4})(?!\d)",
    re.IGNORECASE,
)
_UK_NI_RE = re.compile(
    r"\b(?!BG|GB|NK|KN|TN|NT|ZZ)[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z]\s?\d{2}\s?\d{2}\s?\d{2}\s?[A-D]\b", re.IGNORECASE
)
_CN_ID_RE = re.compile(
    r"(?<![\dA-Za-z])[1-9]\d{5}(?:18|19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\d{3}[\dXx](?![\dA-Za-z])"
)
_CN_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)

# -- dates of birth, IP addresses -----------------------------------------------------------------------
_MONTH = r"(?:jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?|sep(?:t(?:ember)?)?|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)\.?"
_DATE = (
    r"(?:\d{1,2}[/.-]\d{1,2}[/.-](?:\d{4}|\d{2})|\d{4}[/.-]\d{1,2}[/.-]\d{1,2}|"
    rf"\d{{1,2}}(?:st|nd|rd|th)?\s+(?:of\s+)?{_MONTH},?\s+\d{{4}}|{_MONTH}\s+\d{{1,2}}(?:st|nd|rd|th)?,?\s+\d{{4}})(?!\d)"
)
_DOB_RE = re.compile(
    rf"\b(?:dob|d\.o\.b\.?|date\s+of\s+birth|birth\s?date|birthday|born)\b\.?{_SEP}(?:on\s+|in\s+)?"
    rf"(?P<value>{_DATE}|(?:18|19|20)\d{{2}}(?!\d))",
    re.IGNORECASE,
)
_IPV4_FULL_RE = re.compile(
    r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\w]|\.\d)"
)
_IPV6_RE = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
_VERSION_WORD_RE = re.compile(r"(?:\bversion|\bver\.?|\bv|\bbuild|\brelease|\bfirmware)\s*$", re.IGNORECASE)

# -- bare national phone numbers ------------------------------------------------------------------------
_US_BARE_RE = re.compile(r"1?[2-9]\d{2}[2-9]\d{6}")  # NANP: area and exchange never start with 0 or 1
_CN_MOBILE_RE = re.compile(r"1[3-9]\d{9}")
# A tracking number printed in groups ("tracking: 1Z 999 AA1 01 2345 6784"): its tail is no phone.
_TRACKING_GROUPS_RE = re.compile(
    r"\b(?:tracking|track|parcel|shipment)\b\W*(?:[A-Za-z0-9]{1,4}\W+){1,5}$", re.IGNORECASE
)
_REFERENCE_WORD_RE = re.compile(
    r"\b(?:order|invoice|tracking|track|reference|ref|ticket|case|account|acct|customer|member|sku|item|"
    r"product|serial|parcel|shipment|confirmation|booking|transaction|receipt|policy|membership|part|model|sku)\b\W*(?:no\.?|number|#|is|:)?\W*$",
    re.IGNORECASE,
)

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

_CARD_RE = re.compile(r"(?<![\w#$€£¥/.,-])\d(?:[ .-]?\d){12,}(?!\w)")

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


def _is_phone(candidate: str, before: str, *, words: bool = True) -> bool:
    """Whether ``candidate`` (digits and separators) has a phone's shape; ``before``: the text before
    it, where an order or account word vetoes a bare shape and (if ``words``) a phone word admits any."""
    groups = _DIGITS_RE.findall(candidate)
    digits = "".join(groups)
    if not 7 <= len(digits) <= 15:
        return False
    if not (candidate.startswith("+") or "(" in candidate):
        if any(len(g) < 2 for g in groups[1:]):
            return False  # "555 123 4567 2 times": the 2 is not part of the number
        word = words and _PHONE_WORD_RE.search(before)
        if not word and not _national_shape(candidate, groups, digits, before):
            return False
    return not (_DATE_RE.search(candidate) or _IPV4_RE.fullmatch(candidate))


def _national_shape(candidate: str, groups: list[str], digits: str, before: str) -> bool:
    """A phone written without ``+``, area-code parentheses or a phone word before it."""
    if len(groups) == 1:
        if _BARE_TRUNK_RE.fullmatch(digits):
            return True
        # A bare US (10 digits, or 11 with the leading 1) or Chinese mobile (11) number, unless an
        # order, tracking or account word names it as a reference.
        bare = _US_BARE_RE.fullmatch(digits) or _CN_MOBILE_RE.fullmatch(digits)
        return bool(bare) and not _REFERENCE_WORD_RE.search(before[-30:])
    if len(digits) < 9 or _ZIP4_RE.fullmatch(candidate) or _THOUSANDS_RE.fullmatch(candidate):
        return False
    if _REFERENCE_WORD_RE.search(before[-30:]) or _TRACKING_GROUPS_RE.search(before[-40:]):
        return False  # "part number 4111-2222-33", "SKU 555-12-3456", "tracking 1Z 999 AA1 01 2345 6784"
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
                context = (before + run[:start])[-30:]
                if _is_phone(piece, context, words=word_admits) and _key(piece) not in kept:
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


def _cn_id_valid(number: str) -> bool:
    """GB 11643 (ISO 7064 MOD 11-2): the 18th character checks the first 17 digits."""
    total = sum(int(d) * w for d, w in zip(number[:17], _CN_WEIGHTS, strict=True))
    return "10X98765432"[total % 11] == number[17].upper()


def _obfuscated_email(m: re.Match[str]) -> str:
    """An address spelled out to dodge filters; a plain " at " with a plain dotted domain ("look at
    example.com") counts only when the domain is a mail provider or the local part is dotted too."""
    text = m[0]
    if "@" in text and not re.search(r"\s", text):
        return text  # a real address: the e-mail pass already judged it
    bracketed = re.search(r"[\[\(\{<]\s*(?:at|dot)\s*[\]\)\}>]|\s@|@\s", text, re.IGNORECASE)
    spelled_dot = re.search(r"\sdot\s", text, re.IGNORECASE)
    if bracketed or spelled_dot:
        return EMAIL
    local, domain = _PLAIN_AT_RE.split(text, maxsplit=1)
    if "." in local or domain.split(".")[0].casefold() in _MAIL_PROVIDERS:
        return EMAIL
    return text


def _secret(placeholder: str, *, plain_words: bool = True) -> Callable[[re.Match[str]], str]:
    """Replace the ``value`` group of a keyword match; with ``plain_words`` False, a value that is
    an ordinary word about the secret ("password is wrong", "password reset") is kept."""

    def replace(m: re.Match[str]) -> str:
        value = m["value"]
        core = value.strip("\"'").rstrip(".,;:)]")
        if not core:
            return m[0]
        if not plain_words:
            word = core.casefold()
            said = bool(re.search(r"is|was|[:=]|->", m.groupdict().get("sep") or "", re.IGNORECASE))
            bare = core.rstrip("?!")  # "password policy?" is a question, not a password
            looks_secret = bool(re.search(r"\d|[^\w-]", bare)) or (bare[1:] != bare[1:].lower())
            if word in _STATE_WORDS or (core.isalpha() and core.islower() and word.endswith(("ed", "ing", "ly"))):
                return m[0]
            if not said and not looks_secret:
                return m[0]  # "password reset", "password manager": no value given
        start, end = m.span("value")
        lead = value[: len(value) - len(value.lstrip("\"'"))]
        tail = value[len(lead) + len(core) :]
        return m[0][: start - m.start()] + lead + placeholder + tail + m[0][end - m.start() :]

    return replace


def _after_card(m: re.Match[str]) -> str:
    out = CARD + m["gap1"]
    if m["exp"]:
        out += EXPIRY  # (or it was masked already, after its keyword)
    elif m["gap1"].strip(" ,;"):  # an expiry word with no date after it: leave the rest alone
        return m[0]
    out += m["gap2"] if (m["cvv"] or not m["gap2"].strip(" ,;")) else ""
    if m["cvv"]:
        out += CVV
    elif m["gap2"].strip(" ,;"):
        return out + m["gap2"]
    return out


def _ip(m: re.Match[str]) -> str:
    if _VERSION_WORD_RE.search(m.string[max(0, m.start() - 12) : m.start()]):
        return m[0]  # "version 1.2.3.4"
    return IP


def _ipv6(m: re.Match[str]) -> str:
    text = m[0]
    if "::" not in text and text.count(":") != 7:
        return text
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return text
    return IP


def redact(text: str, *, keep: Iterable[str] = ()) -> str:
    """``text`` with personal data replaced by placeholders (see the module docstring for the rules).

    ``keep``: strings never masked (your own contacts).
    """
    if not text:
        return text
    kept = {_key(k) for k in keep}

    def email(m: re.Match[str]) -> str:
        return m[0] if _key(m[0]) in kept else EMAIL

    def cn_id(m: re.Match[str]) -> str:
        return NATIONAL_ID if _cn_id_valid(m[0]) else m[0]

    def uk_ni(m: re.Match[str]) -> str:
        # "model AB123456C": an NI number's shape is also a plausible product code
        return m[0] if _REFERENCE_WORD_RE.search(m.string[max(0, m.start() - 30) : m.start()]) else NATIONAL_ID

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
    text = _OBF_EMAIL_RE.sub(_obfuscated_email, text)
    # Secrets after their keyword first: "PIN 4111" or "password 4111111111111111" is not a card.
    text = _PASSWORD_RE.sub(_secret(PASSWORD, plain_words=False), text)
    text = _CVV_RE.sub(_secret(CVV), text)
    text = _PIN_RE.sub(_secret(PIN), text)
    text = _OTP_RE.sub(_secret(CODE), text)
    text = _EXPIRY_RE.sub(_secret(EXPIRY), text)
    text = _DOB_RE.sub(_secret(DOB), text)
    # National ids before cards and phones: an SSN has a phone's shape, a Chinese id a card's length.
    text = _SSN_WORD_RE.sub(_secret(NATIONAL_ID), text)
    text = _SSN_RE.sub(NATIONAL_ID, text)
    text = _UK_NI_RE.sub(uk_ni, text)
    text = _CN_ID_RE.sub(cn_id, text)
    text = _IBAN_RE.sub(iban, text)
    text = _CARD_RE.sub(card, text)
    text = _AFTER_CARD_RE.sub(_after_card, text)
    text = _IPV4_FULL_RE.sub(_ip, text)
    text = _IPV6_RE.sub(_ipv6, text)
    return _PHONE_RE.sub(phone, text)
