"""mrm-push: Google Calendar watch channels turned into FCM and WebSocket pushes."""
