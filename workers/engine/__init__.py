"""The inference engine: PyTorch and Pillow only, no Django.

It can be imported, tested and benchmarked bare; the Django side (recognition.services)
feeds it bytes and stores what it returns.
"""
