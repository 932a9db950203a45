"""Views: text, JSON, plotly figures, CircuitsVis widgets and the offline HTML page, from results.

Nothing here computes a statistic; each view takes a result. Importing this package loads
neither plotly nor CircuitsVis: each module imports them where a figure is drawn.
"""
