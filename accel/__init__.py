"""The same math as :mod:`hardtovary.reference`, fast."""
