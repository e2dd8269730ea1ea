"""Hold FAQ entries that talk to the assistant or ask customers for secrets, until an operator approves.

An FAQ answer is served word for word in ``faq`` mode and goes into the model's prompt otherwise,
so an uploaded file is a way to speak in the bot's voice. Two kinds of text are held for review
(never served by search or the engine until approved with ``supportbot kb approve ID``, the
console or ``POST /api/kb/entries/{id}/approve``):

**Instructions to an assistant** (prompt injection)
    ``ignore / disregard / forget (all) (your|the) previous / prior / above instructions|rules``;
    ``you are now``, ``from now on you``, ``act as / pretend to be (an AI|assistant|bot)``;
    a role label at the start of a line or sentence (``Assistant:``, ``System:``, ``AI:``,
    ``Bot:``); ``system prompt``; ``instruction(s) for the assistant/AI/model/bot``; chat-template
    markers (``<|im_start|>``, ``[INST]``, ``<<SYS>>``, ``### Instruction``).
**Asking the customer for a secret** (phishing in the bot's voice)
    A secret is a CVV/CVC/security code, a full/whole/complete card number, a password or
    passcode, a PIN, a one-time / verification / 2FA / SMS code (OTP). *Asking* for one means,
    in one sentence, and not negated (``never``, ``not``, ``don't``, ``no one`` … earlier in the
    sentence):

    * handing it over: ``send``, ``give``, ``tell``, ``share``, ``provide``, ``reply/respond with``,
      ``read out``, ``spell out``, ``forward`` (not followed by "you": "we send you a code"), or
      ``email``/``text``/``message``/``post`` + ``us``/``me``/``support``, then the secret
      ("Reply with your one-time code", "email us your password");
    * typing it *to us*: ``type``, ``enter``, ``write``, ``paste`` + the secret + ``here``, ``in
      (this|the) chat``, ``in your reply/message``, ``below``, ``to us``, ``to the agent/assistant``;
    * asking someone for it: ``ask (the) customer/user/them`` … the secret; ``we need``, ``we
      require``, ``what is``, ``please provide`` + ``your`` + the secret.

    So ordinary FAQ wording passes: "we will never ask for your PIN", "reset your password from
    the login page", "enter the one-time code we text you" (typed into the site, not handed to
    anyone), "the CVV is the 3-digit code on the back of your card".

The rules are regular expressions over the normalised text of the question, its phrasings and
the answer; they are deliberately narrow (an operator reviews what they catch) and documented
in ``docs/robustness.md``.
"""

from __future__ import annotations

import re

from knowledge_base.entry import FAQEntry

__all__ = ["check_entry", "check_text"]

_INJECTION = [
    (
        re.compile(
            r"\b(?:ignore|disregard|forget|override|bypass)\b[^.!?\n]{0,30}?"
            r"\b(?:previous|prior|above|earlier|preceding|all|your|the|any|system)\b[^.!?\n]{0,20}?"
            r"\b(?:instructions?|prompts?|rules|directions|guidelines)\b",
            re.IGNORECASE,
        ),
        "tells an assistant to ignore its instructions",
    ),
    (re.compile(r"\byou\s+are\s+now\b|\bfrom\s+now\s+on,?\s+you\b", re.IGNORECASE), "tells an assistant who to be"),
    (
        re.compile(
            r"\b(?:act|behave|respond)\s+as\s+(?:an?\s+|the\s+)?(?:ai|assistant|bot|chatbot|language\s+model|llm)\b|"
            r"\bpretend\s+(?:to\s+be|you\s+are)\b",
            re.IGNORECASE,
        ),
        "tells an assistant who to be",
    ),
    (
        re.compile(r"(?:^|[.!?:]\s+|\n\s*)(?:assistant|system|ai|bot|chatbot|model)\s*:", re.IGNORECASE),
        "contains a line addressed as 'Assistant:'/'System:'",
    ),
    (re.compile(r"\bsystem\s+prompt\b", re.IGNORECASE), "mentions the system prompt"),
    (
        re.compile(
            r"\b(?:instructions?|notes?|message)\s+(?:for|to)\s+(?:the\s+)?(?:assistant|ai|model|bot|chatbot|llm)\b",
            re.IGNORECASE,
        ),
        "addresses instructions to the assistant",
    ),
    (
        re.compile(r"<\|im_start\|>|<\|im_end\|>|\[/?INST\]|<</?SYS>>|###\s*(?:instruction|system)\b", re.IGNORECASE),
        "contains chat-template markers",
    ),
]

_SECRET = (
    r"(?:cvv2?|cvc2?|csc|security\s+code|(?:full|whole|complete|entire|long)\s+(?:credit\s+|debit\s+)?card\s+number|"
    r"card\s+number\s+and\s+(?:the\s+)?(?:cvv|cvc|security\s+code)|pass(?:word|code|phrase)s?|\bpins?\b|pin\s+(?:code|number)|"
    r"one[- ]time\s+(?:pass)?(?:code|password)|otps?|verification\s+codes?|2fa\s+codes?|sms\s+codes?|login\s+codes?)"
    # "a password reset link", "a PIN reminder": about the secret, not the secret itself
    r"(?!\s+(?:reset|resets|manager|policy|hint|reminder|requirements?|rules|change|strength|recovery)\b)"
)
_NEGATION = re.compile(
    r"\b(?:never|not|no\s+one|nobody|don'?t|doesn'?t|won'?t|shouldn'?t|mustn'?t|cannot|can'?t|avoid|neither|nor)\b|n't\b",
    re.IGNORECASE,
)
_ASKS = [
    re.compile(
        r"(?:\b(?:send|give|tell|share|provide|reply\s+with|respond\s+with|read\s+out|spell\s+out|forward)\b(?!\s+you\b)"
        r"(?:\s+(?:us|me|the\s+(?:assistant|agent|bot)|support))?|"
        # verbs that are also nouns ("email address and a password") count only with "us"/"me"
        r"\b(?:e-?mail|text|dm|message|post|whatsapp)\s+(?:us|me|support|the\s+(?:assistant|agent|bot))\b)"
        r"[^.!?\n]{0,40}?" + _SECRET,
        re.IGNORECASE,
    ),
    re.compile(
        r"\b(?:type|enter|write|paste|input|put)\b[^.!?\n]{0,40}?" + _SECRET + r"[^.!?\n]{0,30}?"
        r"\b(?:here|in\s+(?:this|the)\s+chat|in\s+your\s+(?:reply|message|answer|response)|below|to\s+us|"
        r"to\s+the\s+(?:agent|assistant|bot))\b",
        re.IGNORECASE,
    ),
    re.compile(
        r"\bask\s+(?:the\s+|every\s+|each\s+)?(?:customers?|users?|clients?|them|him|her|people|callers?)\b[^.!?\n]{0,60}?"
        + _SECRET,
        re.IGNORECASE,
    ),
    re.compile(
        r"\b(?:we\s+need|we\s+require|i\s+need|what\s+is|what's|please\s+(?:provide|include|confirm))\s+your\b"
        r"[^.!?\n]{0,20}?" + _SECRET,
        re.IGNORECASE,
    ),
]
_SENTENCES = re.compile(r"[^.!?\n]+[.!?\n]*")


def check_text(text: str) -> list[str]:
    """The reasons to hold ``text`` for review (empty when it passes)."""
    reasons = [reason for pattern, reason in _INJECTION if pattern.search(text)]
    for sentence in _SENTENCES.findall(text):
        for ask in _ASKS:
            match = ask.search(sentence)
            if not match:
                continue
            # Negation counts within the clause ("Don't worry, just send us your PIN" is asking).
            clause = max(sentence.rfind(",", 0, match.start()), sentence.rfind(";", 0, match.start())) + 1
            if not _NEGATION.search(sentence[clause : match.end()]):
                reasons.append(f"asks the customer for a secret ({_quote(match[0])})")
                break
    return list(dict.fromkeys(reasons))


def check_entry(entry: FAQEntry) -> str:
    """Why ``entry`` is held for review, as one line ("" when it passes)."""
    reasons: list[str] = []
    for text in (*entry.questions, entry.answer):
        reasons += check_text(text)
    return "; ".join(dict.fromkeys(reasons))


def _quote(text: str) -> str:
    text = " ".join(text.split())
    return f"'{text[:57]}...'" if len(text) > 60 else f"'{text}'"
