"""One module per op: public function, fake kernel, torch fallback, backend choice."""
