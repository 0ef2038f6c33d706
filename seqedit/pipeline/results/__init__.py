"""Reading results: DuckDB views and SQL, plots and the HTML report."""
