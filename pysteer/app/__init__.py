"""The app runtime's handlers: sans-IO objects whose state can move with a connection."""

from pysteer.app.handlers import BUILTIN, Echo, Handler, HandlerError, Http, Ticker, load_handler

__all__ = ["BUILTIN", "Echo", "Handler", "HandlerError", "Http", "Ticker", "load_handler"]
