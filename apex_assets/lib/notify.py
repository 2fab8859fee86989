"""Where a fired alert goes: the log always, plus a webhook, Slack and e-mail when configured.

Why pluggable: every plant routes alerts differently (an on-call webhook, a Slack channel, a
shift supervisor's mailbox), and none of them may be a single point of failure. A
:class:`CompositeNotifier` sends to every channel, logs a failing one with its error and moves
on: an alert must never fail (or stop the asset check that raised it) because Slack is down.
The log channel cannot fail, so a fired alert always leaves a trace.

Each notifier's ``send`` raises on failure, so it can be tested and reused on its own; only the
composite swallows errors.
"""

from __future__ import annotations

import json
import logging
import smtplib
from collections.abc import Sequence
from email.message import EmailMessage
from typing import TYPE_CHECKING, Protocol, runtime_checkable
from urllib.parse import urlsplit

import httpx

from apex_assets.lib.alerts import AlertResult

if TYPE_CHECKING:
    from apex_assets.config import Settings

__all__ = [
    "CompositeNotifier",
    "EmailNotifier",
    "LogNotifier",
    "Notifier",
    "NotifyError",
    "SlackNotifier",
    "WebhookNotifier",
    "notifier_from_settings",
]

#: the logger alerts are written to (and delivery failures reported on)
log = logging.getLogger("apex.alerts")

_LEVEL = {"critical": logging.CRITICAL, "high": logging.ERROR, "warning": logging.WARNING}
_SLACK_EMOJI = {"critical": ":rotating_light:", "high": ":rotating_light:", "warning": ":warning:"}


class NotifyError(RuntimeError):
    """A channel could not deliver an alert (bad HTTP status, refused recipients)."""


@runtime_checkable
class Notifier(Protocol):
    """One delivery channel. ``send`` raises on failure."""

    channel: str

    def send(self, alert: AlertResult) -> None: ...


def _headline(alert: AlertResult) -> str:
    return f"[{alert.severity.upper()}] {alert.name}: {alert.message}"


def _check_url(url: str, what: str) -> str:
    parts = urlsplit(url or "")
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"{what} must be an http(s) URL, got {url!r}")
    return url


def _check_timeout(timeout_s: float) -> float:
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
    return float(timeout_s)


def _post_json(url: str, payload: dict, timeout_s: float, channel: str) -> None:
    response = httpx.post(url, json=payload, timeout=timeout_s)
    if not 200 <= response.status_code < 300:
        body = response.text[:200]
        raise NotifyError(f"{channel}: HTTP {response.status_code} from {url}: {body}")


class LogNotifier:
    """Writes the alert to the ``apex.alerts`` logger at a level matching its severity."""

    channel = "log"

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.logger = logger or log

    def send(self, alert: AlertResult) -> None:
        self.logger.log(_LEVEL.get(alert.severity, logging.WARNING), "%s", _headline(alert))


class WebhookNotifier:
    """POSTs ``alert.to_dict()`` as JSON (PagerDuty/Opsgenie bridges, an in-house receiver)."""

    channel = "webhook"

    def __init__(self, url: str, timeout_s: float = 5.0) -> None:
        self.url = _check_url(url, "webhook url")
        self.timeout_s = _check_timeout(timeout_s)

    def send(self, alert: AlertResult) -> None:
        _post_json(self.url, alert.to_dict(), self.timeout_s, self.channel)


class SlackNotifier:
    """POSTs ``{"text": ...}`` to a Slack incoming webhook."""

    channel = "slack"

    def __init__(self, webhook_url: str, timeout_s: float = 5.0) -> None:
        self.webhook_url = _check_url(webhook_url, "Slack webhook url")
        self.timeout_s = _check_timeout(timeout_s)

    @staticmethod
    def text(alert: AlertResult) -> str:
        """``:rotating_light: [CRITICAL] false_accept_rate: FAR 1.52% > 1.00% ...``"""
        return f"{_SLACK_EMOJI.get(alert.severity, ':rotating_light:')} {_headline(alert)}"

    def send(self, alert: AlertResult) -> None:
        _post_json(self.webhook_url, {"text": self.text(alert)}, self.timeout_s, self.channel)


class EmailNotifier:
    """Sends a plain-text e-mail through an SMTP relay (the plant's mail server)."""

    channel = "email"

    def __init__(
        self,
        host: str,
        port: int,
        sender: str,
        recipients: Sequence[str],
        timeout_s: float = 10.0,
    ) -> None:
        if not host:
            raise ValueError("EmailNotifier needs an SMTP host")
        if not isinstance(port, int) or not 0 < port < 65536:
            raise ValueError(f"SMTP port must be 1-65535, got {port!r}")
        recipients = [r.strip() for r in recipients if r and r.strip()]
        if not recipients:
            raise ValueError("EmailNotifier needs at least one recipient")
        for address in [sender, *recipients]:
            if "@" not in (address or ""):
                raise ValueError(f"not an e-mail address: {address!r}")
        self.host, self.port, self.sender = host, port, sender
        self.recipients = tuple(recipients)
        self.timeout_s = _check_timeout(timeout_s)

    @staticmethod
    def subject(alert: AlertResult) -> str:
        """``[Apex CRITICAL] false_accept_rate: FAR 1.52% > 1.00% ...`` (one line, <= 200 chars)."""
        text = f"[Apex {alert.severity.upper()}] {alert.name}: {alert.message}"
        text = " ".join(text.split())
        return text if len(text) <= 200 else text[:197] + "..."

    def message(self, alert: AlertResult) -> EmailMessage:
        msg = EmailMessage()
        msg["Subject"] = self.subject(alert)
        msg["From"] = self.sender
        msg["To"] = ", ".join(self.recipients)
        msg.set_content(
            f"{alert.message}\n\n"
            f"severity: {alert.severity}\n"
            f"value: {alert.value}\nthreshold: {alert.threshold}\n\n"
            f"{json.dumps(alert.to_dict(), indent=2, sort_keys=True)}\n"
        )
        return msg

    def send(self, alert: AlertResult) -> None:
        with smtplib.SMTP(self.host, self.port, timeout=self.timeout_s) as smtp:
            refused = smtp.send_message(self.message(alert))
        if refused:  # some (not all) recipients refused: the others got it, so say so, loudly
            log.error("alert e-mail refused for %s", ", ".join(sorted(refused)))


class CompositeNotifier:
    """Sends a fired alert to every channel; a failing channel is logged and skipped."""

    def __init__(self, notifiers: Sequence[Notifier]) -> None:
        self.notifiers = list(notifiers)

    @property
    def channels(self) -> list[str]:
        return [n.channel for n in self.notifiers]

    def notify(self, alert: AlertResult) -> list[str]:
        """The channels that delivered ``alert`` ([] for an alert that did not fire). Never raises."""
        if not alert.fired:
            return []
        delivered: list[str] = []
        for notifier in self.notifiers:
            try:
                notifier.send(alert)
            except Exception as exc:  # one broken channel must not silence the others
                log.error(
                    "alert %s (%s): channel %s failed: %s: %s",
                    alert.name,
                    alert.window_start.isoformat(),
                    notifier.channel,
                    type(exc).__name__,
                    exc,
                )
            else:
                delivered.append(notifier.channel)
        return delivered


def notifier_from_settings(settings: Settings) -> CompositeNotifier:
    """The log always; a webhook, Slack and e-mail when their settings are present.

    E-mail needs ``APEX_SMTP_HOST``: a recipient list without a mail server is a
    misconfiguration, reported now rather than at the first critical alert.
    """
    notifiers: list[Notifier] = [LogNotifier()]
    if settings.alert_webhook_url:
        notifiers.append(WebhookNotifier(settings.alert_webhook_url))
    if settings.alert_slack_webhook_url:
        notifiers.append(SlackNotifier(settings.alert_slack_webhook_url))
    if settings.alert_email_to:
        if not settings.smtp_host:
            raise ValueError(
                "APEX_ALERT_EMAIL_TO is set but APEX_SMTP_HOST is not: set the SMTP host"
            )
        notifiers.append(
            EmailNotifier(
                settings.smtp_host,
                settings.smtp_port,
                settings.alert_email_from,
                settings.alert_email_to,
            )
        )
    return CompositeNotifier(notifiers)
