"""The multi-host deployment drill (issue 16): its own CI step, `make drill`."""
