"""The traffic core: releases, A/B variants, shadow, cache, fallback and coalescing between a
protocol front and the stage groups. It knows no protocol."""
