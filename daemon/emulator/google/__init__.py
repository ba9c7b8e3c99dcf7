"""Google Calendar stand-in: events.watch, channels.stop, events.list and the webhook calls."""

from daemon.emulator.google.api import CALENDAR_SCOPES
from daemon.emulator.google.calendars import MAX_SYNC_TOKENS_PER_CALENDAR
from daemon.emulator.google.channels import MAX_CHANNEL_TTL, RETRY_STATUSES
from daemon.emulator.google.emulator import GoogleCalendarEmulator, MovableClock
from daemon.emulator.google.errors import GoogleApiError, error_for
from daemon.emulator.google.failures import METHODS, Failure
from daemon.emulator.google.model import Calendar, Channel, Event, Settings, WebhookAttempt

__all__ = [
    "CALENDAR_SCOPES",
    "MAX_CHANNEL_TTL",
    "MAX_SYNC_TOKENS_PER_CALENDAR",
    "METHODS",
    "RETRY_STATUSES",
    "Calendar",
    "Channel",
    "Event",
    "Failure",
    "GoogleApiError",
    "GoogleCalendarEmulator",
    "MovableClock",
    "Settings",
    "WebhookAttempt",
    "error_for",
]
