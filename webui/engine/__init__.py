"""The engine: everything between a validated request and saved images. No UI code here."""
