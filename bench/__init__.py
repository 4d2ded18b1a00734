"""`make bench`: this project against the obvious alternatives, side by side on one machine."""
