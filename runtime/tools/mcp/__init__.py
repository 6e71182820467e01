"""Tools from Model Context Protocol servers (DUCKLM_MCP_CONFIG).

config.py reads and checks the file, session.py holds the connections (the
only module that imports the `mcp` SDK, and only when a server starts),
tool.py turns each listed tool into a gateway Tool, toolbox.py ties them
together for the runtime. Import `McpToolbox` from toolbox.py; this package
imports nothing itself, so naming it costs nothing when MCP is not used.
"""
