"""Stand-ins for Google OAuth, Google Calendar and FCM that speak the real wire format."""
