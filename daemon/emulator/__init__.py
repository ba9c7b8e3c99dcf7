"""Stand-ins for Google OAuth, Google Calendar and FCM that speak the real wire format."""

from daemon.emulator.app import Emulator, build_emulator_app
from daemon.emulator.google import GoogleCalendarEmulator
from daemon.emulator.keys import public_key_pem, write_service_account
from daemon.emulator.oauth import OAuthEmulator

__all__ = [
    "Emulator",
    "GoogleCalendarEmulator",
    "OAuthEmulator",
    "build_emulator_app",
    "public_key_pem",
    "write_service_account",
]
