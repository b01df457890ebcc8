# Test backend image: Debian's static busybox, nothing else. Built by scripts/test from a
# context holding rootfs/bin/{busybox,drover-test-entry,prometheus}; FROM scratch so nothing
# is pulled. /bin/prometheus is a stand-in that stays up and counts HUPs (the monitoring
# add-on's e2e runs this image as PROMETHEUS_IMAGE).
#   docker service create IMAGE                         -> httpd on :80 answering its hostname
#   docker service create IMAGE sleep 3600              -> any busybox applet
FROM scratch
COPY rootfs/ /
RUN ["/bin/busybox", "--install", "-s", "/bin"]
ENV PATH=/bin
ENTRYPOINT ["/bin/drover-test-entry"]
CMD ["httpd", "-f", "-p", "80", "-h", "/www"]
