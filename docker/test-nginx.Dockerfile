# Test nginx image: Debian's /usr/sbin/nginx with the libraries ldd lists, a minimal
# nginx.conf that includes /etc/nginx/conf.d/*.conf (bind-mount a host dir there), and
# busybox for a shell. Built by scripts/test; FROM scratch so nothing is pulled.
# Port 8080 always answers /healthz; port 80 answers 404 for unknown hosts.
FROM scratch
COPY rootfs/ /
RUN ["/bin/busybox", "--install", "-s", "/bin"]
ENV PATH=/usr/sbin:/bin
EXPOSE 80 8080
CMD ["nginx", "-g", "daemon off;"]
