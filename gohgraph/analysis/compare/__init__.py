"""The comparison of dense, MoH, GoH and expert variants at matched size: variants, runs, records, report."""
