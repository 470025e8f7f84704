"""The syslog receiver (RFC 3164 and 5424 over UDP, RFC 6587 over TCP): agents, iPXE, BMCs."""
